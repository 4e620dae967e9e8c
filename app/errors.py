"""Every way an intake request can fail, as one tree.

Each leaf carries the HTTP status it is answered with and the Orthanc error
(name and code from Orthanc's ``ErrorCode`` enumeration) that the public
listener puts in its Orthanc-shaped JSON. Nothing here imports FastAPI.

::

    IntakeError
    ├── Unauthenticated ............. 401  (carries WWW-Authenticate)
    │   └── AdminUnauthenticated      the admin listener's realm
    ├── Forbidden ................... 403  (authenticated, but the site's policy says no)
    │   ├── AddressNotAllowed         client address outside the site's allow-list
    │   ├── ContentNotAllowed         modality / SOP Class outside the site's allow-list
    │   ├── ClientCertificateRequired the site is bound to a client certificate; none was sent
    │   ├── ClientCertificateMismatch a client certificate other than the site's was sent
    │   ├── AdminForbidden            client address outside the admin allow-list
    │   └── CrossSiteRequest          admin: a state change a foreign page made a browser send
    ├── BadRequest .................. 400  (admin: an operation that cannot be done as asked)
    │   ├── InvalidCursor             a pagination cursor the API did not hand out
    │   ├── HostNotAllowed            a Host outside the listener's allow-list (DNS rebinding)
    │   └── InvalidChange             a site, admin or policy change that cannot be made as asked
    │       ├── InvalidName           a site or admin name outside the allowed characters
    │       ├── InvalidPolicy         a policy value that does not parse (CIDR, limit, fingerprint…)
    │       └── UnknownTokenPrefix    no unrevoked token with that prefix
    ├── NotFound .................... 404  (no such route, or no such record)
    │   ├── SiteNotFound              no site of that name
    │   ├── AdminNotFound             no admin of that name
    │   └── DeliveryNotFound          no such webhook delivery
    ├── MethodNotAllowed ............ 405
    ├── NotAcceptable ............... 406  (STOW-RS: an Accept the intake cannot answer in)
    ├── Conflict .................... 409  (admin: that change does not fit the record's state)
    │   ├── SiteExists                the name is taken (deleted sites keep theirs)
    │   ├── AdminExists               the name is taken
    │   ├── WrongState                e.g. discarding a forwarded upload
    │   ├── BeingForwarded            the forwarder holds the row right now
    │   ├── NothingToRetry            the kept spool file is gone
    │   ├── ConflictNotRetryable      a same-UID-other-bytes upload: Orthanc would ignore it
    │   ├── HeldByAnotherNode         its file is in another host's spool: ask that host
    │   └── DeliveryNotFailed         only failed webhook deliveries are retried
    ├── ClientTimeout ............... 408  (body trickled slower than allowed)
    ├── UriTooLong .................. 414  (a request target over the header cap)
    ├── HeadersTooLarge ............. 431  (request headers over the size or count cap)
    ├── InstanceTooLarge ............ 413  (body or inflated body over the cap)
    │   ├── ArchiveTooLarge           a ZIP over its entry, inflated-size or ratio caps
    │   └── TooManyParts              a multipart body with more parts than allowed
    ├── UnsupportedEncoding ......... 415  (Content-Encoding other than gzip/identity)
    ├── UnsupportedMediaType ........ 415  (a Content-Type the route does not take)
    ├── TooManyRequests ............. 429  (carries Retry-After)
    │   ├── RateLimited               instances per minute
    │   ├── QuotaExceeded             bytes per day
    │   ├── TooManyConcurrentUploads  uploads in progress
    │   └── TooManyFailedLogins       this address failed authentication too often
    ├── BadUpload ................... 400  (the bytes are not an acceptable instance)
    │   ├── NotDicom                  no DICM prefix, garbage, truncated, empty
    │   ├── MalformedDicom            lengths past the end, bad item structure
    │   ├── MissingTag                a required attribute is absent or empty
    │   ├── InvalidUid                a UID breaks PS3.5 §9.1
    │   ├── IdentifierTooLong         PatientID or a UID over Orthanc's 256 bytes
    │   ├── UnsupportedTransferSyntax unknown or private transfer syntax
    │   ├── NestingTooDeep            sequences nested deeper than the cap
    │   ├── TooManyElements           more data elements than the cap
    │   ├── InflateLimitExceeded      Deflated transfer syntax inflates past the cap
    │   ├── CorruptCompression        gzip / deflate stream is not valid
    │   ├── RefusedPreamble           executable preamble (CVE-2019-11687)
    │   ├── DicomdirNotAnInstance     a DICOMDIR (media directory) sent as an instance
    │   ├── MalformedArchive          a ZIP that cannot be read safely (overlaps, encryption…)
    │   ├── NestedArchive             a ZIP inside a ZIP: refused, never opened
    │   ├── MalformedMultipart        a multipart body that does not parse
    │   └── StudyMismatch             STOW-RS: an instance outside the study in the URL
    ├── SpoolFull ................... 507  (carries Retry-After)
    └── ServiceUnavailable .......... 503  (carries Retry-After; database down)

The leaves of the admin operations (``InvalidChange``, ``SiteNotFound``, ``SiteExists`` …)
keep their parent's ``reason``: the admin API answers ``bad_request``, ``not_found`` and
``conflict`` for them, as its clients expect.

The pipeline hands a refusal it has already logged (and, with ``counted``, counted) to the
routes as ``Refused``: an outcome that carries the error, not a second failure. Nothing in
this tree is changed after it is raised.
"""

from __future__ import annotations

from collections.abc import Mapping


class IntakeError(Exception):
    """Base of the tree; ``detail`` is the precise, human-readable reason."""

    status_code: int = 500
    orthanc_error: str = "Internal error"
    orthanc_status: int = -1
    message: str = "Internal error"
    reason: str = "internal_error"

    def __init__(self, detail: str = "", *, site: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        # Whose request it refused, when the refusing code knows it before the route does
        # (a token that was the site's, an address outside its allow-list): the refusal
        # log names the site (access/refusals.py).
        self.site = site

    @property
    def headers(self) -> Mapping[str, str]:
        return {}


class Unauthenticated(IntakeError):
    status_code = 401
    orthanc_error = "Unauthorized"
    orthanc_status = 29
    message = "Unauthorized"
    reason = "unauthenticated"

    @property
    def headers(self) -> Mapping[str, str]:
        return {"WWW-Authenticate": 'Basic realm="Orthanc Intake"'}


class AdminUnauthenticated(Unauthenticated):
    @property
    def headers(self) -> Mapping[str, str]:
        # Not Basic: a browser shown a Basic challenge remembers what was typed and sends
        # it with every later request to this origin, a foreign page's included.
        return {"WWW-Authenticate": 'Bearer realm="Orthanc Intake admin"'}


class Forbidden(IntakeError):
    status_code = 403
    orthanc_error = "Bad request"
    orthanc_status = 8
    message = "Forbidden"
    reason = "forbidden"


class AddressNotAllowed(Forbidden):
    reason = "address_not_allowed"


class ContentNotAllowed(Forbidden):
    reason = "content_not_allowed"


class ClientCertificateRequired(Forbidden):
    reason = "client_certificate_required"


class ClientCertificateMismatch(Forbidden):
    reason = "client_certificate_mismatch"


class AdminForbidden(Forbidden):
    reason = "admin_address_not_allowed"


class CrossSiteRequest(Forbidden):
    reason = "cross_site_request"


class BadRequest(IntakeError):
    """A request the admin API cannot carry out as asked (the detail says why)."""

    status_code = 400
    orthanc_error = "Bad request"
    orthanc_status = 8
    message = "Bad request"
    reason = "bad_request"


class InvalidCursor(BadRequest):
    """A pagination cursor this API did not hand out (or one that was altered)."""

    reason = "invalid_cursor"


class HostNotAllowed(BadRequest):
    reason = "host_not_allowed"


class InvalidChange(BadRequest):
    """A site, admin or policy change that cannot be made as asked (the detail says why)."""


class InvalidName(InvalidChange):
    pass


class InvalidPolicy(InvalidChange):
    pass


class UnknownTokenPrefix(InvalidChange):
    pass


class NotFound(IntakeError):
    status_code = 404
    orthanc_error = "Unknown resource"
    orthanc_status = 17
    message = "Unknown resource"
    reason = "not_found"


class SiteNotFound(NotFound):
    pass


class AdminNotFound(NotFound):
    pass


class MethodNotAllowed(IntakeError):
    status_code = 405
    orthanc_error = "Bad request"
    orthanc_status = 8
    message = "Method not allowed"
    reason = "method_not_allowed"


class NotAcceptable(IntakeError):
    status_code = 406
    orthanc_error = "Bad request"
    orthanc_status = 8
    message = "Not acceptable"
    reason = "not_acceptable"


class Conflict(IntakeError):
    status_code = 409
    orthanc_error = "Bad request"
    orthanc_status = 8
    message = "Conflict"
    reason = "conflict"


class SiteExists(Conflict):
    pass


class AdminExists(Conflict):
    pass


class WrongState(Conflict):
    reason = "wrong_state"


class BeingForwarded(Conflict):
    reason = "being_forwarded"


class NothingToRetry(Conflict):
    reason = "nothing_to_retry"


class ConflictNotRetryable(Conflict):
    reason = "conflict_not_retryable"


class HeldByAnotherNode(Conflict):
    reason = "held_by_another_node"


class DeliveryNotFound(NotFound):
    reason = "delivery_not_found"


class DeliveryNotFailed(Conflict):
    reason = "delivery_not_failed"


class ClientTimeout(IntakeError):
    status_code = 408
    orthanc_error = "Timeout"
    orthanc_status = 16
    message = "Request body timeout"
    reason = "client_timeout"


class UriTooLong(IntakeError):
    status_code = 414
    orthanc_error = "Bad request"
    orthanc_status = 8
    message = "URI too long"
    reason = "uri_too_long"


class HeadersTooLarge(IntakeError):
    status_code = 431
    orthanc_error = "Bad request"
    orthanc_status = 8
    message = "Request header fields too large"
    reason = "headers_too_large"


class InstanceTooLarge(IntakeError):
    status_code = 413
    orthanc_error = "Bad request"
    orthanc_status = 8
    message = "Instance too large"
    reason = "too_large"


class ArchiveTooLarge(InstanceTooLarge):
    message = "Archive too large"
    reason = "archive_too_large"


class TooManyParts(InstanceTooLarge):
    message = "Too many parts"
    reason = "too_many_parts"


class UnsupportedEncoding(IntakeError):
    status_code = 415
    orthanc_error = "Bad request"
    orthanc_status = 8
    message = "Unsupported content encoding"
    reason = "unsupported_encoding"


class UnsupportedMediaType(IntakeError):
    status_code = 415
    orthanc_error = "Bad request"
    orthanc_status = 8
    message = "Unsupported media type"
    reason = "unsupported_media_type"


class TooManyRequests(IntakeError):
    status_code = 429
    orthanc_error = "Bad request"
    orthanc_status = 8
    message = "Too many requests"
    reason = "too_many_requests"

    def __init__(self, detail: str = "", retry_after: int = 60) -> None:
        super().__init__(detail)
        self.retry_after = max(1, retry_after)

    @property
    def headers(self) -> Mapping[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimited(TooManyRequests):
    reason = "rate_limited"


class QuotaExceeded(TooManyRequests):
    reason = "quota_exceeded"


class TooManyConcurrentUploads(TooManyRequests):
    reason = "too_many_concurrent_uploads"


class TooManyFailedLogins(TooManyRequests):
    reason = "too_many_failed_logins"


class BadUpload(IntakeError):
    status_code = 400
    orthanc_error = "Bad file format"
    orthanc_status = 15
    message = "Bad file format"
    reason = "bad_file"


class NotDicom(BadUpload):
    reason = "not_dicom"


class MalformedDicom(BadUpload):
    reason = "malformed"


class MissingTag(BadUpload):
    orthanc_error = "Inexistent tag"
    orthanc_status = 21
    message = "Inexistent tag"
    reason = "missing_tag"


class InvalidUid(BadUpload):
    reason = "invalid_uid"


class IdentifierTooLong(BadUpload):
    """Orthanc 1.10.1 refuses an instance whose PatientID, Study, Series or SOP Instance
    UID is over 256 bytes in UTF-8 (measured: 400 "Bad type for a parameter")."""

    orthanc_error = "Bad type for a parameter"
    orthanc_status = 4
    message = "Bad type for a parameter"
    reason = "identifier_too_long"


class UnsupportedTransferSyntax(BadUpload):
    reason = "unsupported_transfer_syntax"


class NestingTooDeep(BadUpload):
    reason = "nesting_too_deep"


class TooManyElements(BadUpload):
    reason = "too_many_elements"


class InflateLimitExceeded(BadUpload):
    reason = "inflate_limit"


class CorruptCompression(BadUpload):
    reason = "corrupt_compression"


class RefusedPreamble(BadUpload):
    message = "Refused preamble"
    reason = "executable_preamble"


class DicomdirNotAnInstance(NotDicom):
    reason = "dicomdir"


class MalformedArchive(BadUpload):
    message = "Bad archive"
    reason = "malformed_archive"


class NestedArchive(BadUpload):
    message = "Nested archive"
    reason = "nested_archive"


class MalformedMultipart(BadUpload):
    message = "Bad multipart body"
    reason = "malformed_multipart"


class StudyMismatch(BadUpload):
    message = "Study mismatch"
    reason = "study_mismatch"


class SpoolFull(IntakeError):
    status_code = 507
    orthanc_error = "The file storage is full"
    orthanc_status = 19
    message = "The file storage is full"
    reason = "spool_full"

    @property
    def headers(self) -> Mapping[str, str]:
        return {"Retry-After": "60"}


class ServiceUnavailable(IntakeError):
    status_code = 503
    orthanc_error = "The database is currently not available"
    orthanc_status = 36
    message = "Service unavailable"
    reason = "unavailable"

    @property
    def headers(self) -> Mapping[str, str]:
        return {"Retry-After": "10"}


class ForwardError(Exception):
    """Delivery to the private Orthanc failed; never rendered to a site.

    ::

        ForwardError
        ├── OrthancUnavailable   unreachable, timed out, or a 5xx answer: retried
        └── OrthancRefused       a 4xx answer: the instance is quarantined
    """

    def __init__(self, detail: str, *, answered: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.answered = answered  # True when Orthanc sent an HTTP answer


class OrthancUnavailable(ForwardError):
    pass


class OrthancRefused(ForwardError):
    pass


class Refused(Exception):
    """A refusal the pipeline has logged as an upload event, raised to the route: an
    outcome, not a new failure. The route answers ``error`` (with ``detail`` in place of
    the error's own, when given) and writes no ``upload.refused`` line for it.
    ``counted``: the refusal metric has it too (else the request's admission counts it).
    """

    def __init__(self, error: IntakeError, *, counted: bool, detail: str | None = None) -> None:
        super().__init__(error.detail)
        self.error = error
        self.counted = counted
        self.detail = error.detail if detail is None else detail
