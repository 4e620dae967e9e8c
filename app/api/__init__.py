"""HTTP routes: thin; they authenticate, call the domain, and raise."""
