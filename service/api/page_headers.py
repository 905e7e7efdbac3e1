"""Headers for the HTML report pages the API serves (signed-link or with the key): the pages are
inert (no script, nothing loaded from elsewhere), and these make the browser hold them to it."""

REPORT_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "private, no-store",
}
