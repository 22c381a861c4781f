"""``serve --http``: ``http_door`` (loopback by default, a token, TLS), ``metrics`` (Prometheus), ``dashboard``
(the live page and ``/api/fleet``)."""
