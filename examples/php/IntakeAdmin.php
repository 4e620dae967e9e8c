<?php
/**
 * A small client for the Orthanc Intake admin API, for PHP apps (curl extension).
 *
 *   $api = new IntakeAdmin('http://127.0.0.1:8001', getenv('INTAKE_ADMIN_TOKEN'));
 *   foreach ($api->recentUploads(20) as $u) { echo $u['receipt'], ' ', $u['state'], "\n"; }
 *
 * Every error of the API is {"error": ..., "detail": ...}; it is thrown as an
 * IntakeAdminError carrying the HTTP status, the machine reason and the detail.
 */

declare(strict_types=1);

final class IntakeAdminError extends RuntimeException
{
    public function __construct(
        public readonly int $status,
        public readonly string $reason,
        string $detail
    ) {
        parent::__construct("HTTP $status $reason: $detail");
    }
}

final class IntakeAdmin
{
    public function __construct(
        private readonly string $baseUrl,
        private readonly string $token,
        private readonly int $timeoutSeconds = 30
    ) {
    }

    /** The newest intake records, optionally filtered (site, state, study_uid, ...). */
    public function recentUploads(int $limit = 50, array $filters = []): array
    {
        return $this->call('GET', '/api/uploads', ['limit' => $limit] + $filters)['items'];
    }

    /** Every record matching the filters, page after page (keyset cursor). */
    public function allUploads(array $filters = [], int $pageSize = 500): Generator
    {
        $cursor = null;
        do {
            $query = ['limit' => $pageSize] + $filters + ($cursor ? ['cursor' => $cursor] : []);
            $page = $this->call('GET', '/api/uploads', $query);
            yield from $page['items'];
            $cursor = $page['next_cursor'];
        } while ($cursor !== null);
    }

    /** One study of one site: counts by state, its series, whether it is quiet. */
    public function study(string $site, string $studyUid): array
    {
        return $this->call('GET', '/api/studies/' . rawurlencode($site) . '/' . rawurlencode($studyUid));
    }

    /** What waits in quarantine, with reasons. */
    public function quarantined(int $limit = 100): array
    {
        return $this->call('GET', '/api/queue', ['state' => 'quarantined', 'limit' => $limit])['items'];
    }

    /** Send a quarantined upload to Orthanc again. */
    public function retry(int $uploadId): array
    {
        return $this->call('POST', "/api/uploads/$uploadId/retry", [], new stdClass());
    }

    private function call(string $method, string $path, array $query = [], ?object $body = null): array
    {
        $url = rtrim($this->baseUrl, '/') . $path . ($query ? '?' . http_build_query($query) : '');
        $curl = curl_init($url);
        $headers = ['Authorization: Bearer ' . $this->token, 'Accept: application/json'];
        if ($body !== null) {
            $headers[] = 'Content-Type: application/json';
            curl_setopt($curl, CURLOPT_POSTFIELDS, json_encode($body));
        }
        curl_setopt_array($curl, [
            CURLOPT_CUSTOMREQUEST => $method,
            CURLOPT_HTTPHEADER => $headers,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_TIMEOUT => $this->timeoutSeconds,
        ]);
        $raw = curl_exec($curl);
        if ($raw === false) {
            $error = curl_error($curl);
            curl_close($curl);
            throw new IntakeAdminError(0, 'unreachable', $error);
        }
        $status = curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
        curl_close($curl);
        $data = json_decode($raw, true);
        if ($status >= 400) {
            throw new IntakeAdminError($status, $data['error'] ?? 'http_error', $data['detail'] ?? $raw);
        }
        return $data;
    }
}
