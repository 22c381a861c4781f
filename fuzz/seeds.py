"""Write each target's seed corpus, ``fuzz/corpus/<target>/``: valid objects encoded (the payloads the
hostile-input tests are built on), valid logs in both formats, a gzipped log, a config file.

Run ``python -m fuzz.seeds`` again after a format changes; the files are committed."""

from __future__ import annotations

import base64
import gzip
import hashlib
from pathlib import Path

import orjson

from edge_agent.contract.answers import AnswerReceipt
from edge_agent.contract.privacy import DpParams
from tests.test_hostile_input import (
    ANNOUNCEMENT,
    BUNDLE,
    DEEP,
    RECEIPT,
    RESULTS,
    STATUS,
    UPDATE,
    _announcement,
    _header_of,
)

# a central-DP round announced in float16 (issue #26): the optional fields a plain round does not carry
DP_ANNOUNCEMENT = _announcement(dp=DpParams("central", 1.5, 1e-5), weights_dtype="float16").encode()
ANSWERED = [AnswerReceipt("dev-1", 3, "ab" * 32, "accepted").encode(),
            AnswerReceipt("d.x:1", 0, "0" * 64, "duplicate").encode()]

CORPUS = Path(__file__).parent / "corpus"

CSV = (b"ts,device_id,ax,ay,label\n0.0,d1,1.5,-2,walk\n0.02,d1,1.25e-3,0,walk\n0.01,d2,,3,\n"
       b'0.04,"d,1",1,2,run\n0.05,d1,nan,1,walk\n')
JSONL = (b'{"ts":0.0,"device_id":"d1","ax":1.5,"ay":-2,"label":"walk"}\n'
         b'{"ts":0.02,"device_id":"d1","ax":null,"ay":0}\n\n'
         b'{"ts":0.01,"device_id":"d2","ax":1e3,"ay":3,"label":"run"}\n')
_BEARER = b"Authorization: Bearer fuzz-token-0123456789abcdef\r\n"  # fuzz.http_door.TOKEN
_BASIC = b"Authorization: Basic " + base64.b64encode(b"ops:fuzz-token-0123456789abcdef") + b"\r\n"
HTTP = [b"GET / HTTP/1.1\r\nHost: hub\r\n" + _BEARER + b"\r\n",
        b"GET /api/fleet HTTP/1.1\r\nHost: hub\r\n" + _BASIC + b"Connection: close\r\n\r\n",
        b"GET /metrics?name[]=edgeml_hub_messages_total HTTP/1.0\r\n" + _BEARER + b"Accept: text/plain\r\n\r\n",
        b"HEAD /index.html HTTP/1.1\r\n" + _BEARER + b"\r\n",
        b"POST /api/fleet HTTP/1.1\r\n" + _BEARER + b"Content-Length: 2\r\n\r\n{}",
        b"GET /devices/dev-a HTTP/1.1\r\nHost: hub\r\n" + _BEARER + b"\r\n",
        b"GET /api/devices/dev-b?x=1 HTTP/1.1\r\n" + _BASIC + b"\r\n",
        b"GET /devices/%3Cb%3E'%22&x HTTP/1.1\r\n" + _BEARER + b"\r\n",
        b"GET /nowhere HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n"]
TOML = (b'broker = "mqtt://localhost:1883"\nprefix = "edge"\ndevice_id = "dev-1"\nsim_rate_hz = 25.0\n'
        b'sim_channels = ["ax", "ay"]\nreceipts = false\nfeatures = "sampled"\nmetrics_port = 9100\n')


def _secure() -> tuple[list[bytes], list[bytes]]:
    """A secure round's steps and answers, one of each kind (fixed keys: the seeds stay the same)."""
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from edge_agent.contract import secagg
    from edge_agent.contract import secure_rounds as sr

    session = secagg.Session(b"m/round 7", ("d1", "d2", "d3"), 2, 10)
    keys = [X25519PrivateKey.from_private_bytes(bytes([i + 1]) * 32).public_key().public_bytes_raw() for i in range(6)]
    adverts = tuple(secagg.Advert(d, keys[2 * i], keys[2 * i + 1]) for i, d in enumerate(session.participants))
    sealed = bytes(range(sr.SEALED_BYTES))
    ring = np.arange(16, dtype=np.uint32)
    steps = [sr.Step(7, "m", "d1", "share", adverts=adverts),
             sr.Step(7, "m", "d1", "mask", sealed={"d2": sealed, "d3": sealed}, senders=("d1", "d2", "d3")),
             sr.Step(7, "m", "d1", "reveal", survivors=("d1", "d2"), dropped=("d3",))]
    answers = [sr.Answer(7, "m", "d1", "advert", advert=adverts[0], sent=1.0),
               sr.Answer(7, "m", "d1", "shares", sealed={"d2": sealed, "d3": sealed}, sent=1.0),
               sr.Answer(7, "m", "d1", "masked", size=16, bits=10, stats=16, sent=1.0,
                         body=secagg.pack(ring, 10) + secagg.pack(ring, sr.STATS_BITS)),
               sr.Answer(7, "m", "d1", "reveal", revealed={"d1": ("b", 12345), "d3": ("s", 2 ** 500)}, sent=1.0)]
    return [s.encode() for s in steps], [a.encode() for a in answers]


def seeds() -> dict[str, list[bytes]]:
    _, header, _ = _header_of(BUNDLE)
    return {
        "results": [RESULTS], "status": [STATUS], "receipt": [RECEIPT], "update": [UPDATE],
        "announcement": [ANNOUNCEMENT, DP_ANNOUNCEMENT], "answered": ANSWERED, "bundle": [BUNDLE], "manifest": [orjson.dumps(header), DEEP],
        "log_csv": [CSV, CSV.replace(b"\n", b"\r\n")], "log_jsonl": [JSONL],
        "log_gz": [b"\0" + gzip.compress(CSV, mtime=0), b"\x81" + CSV],
        "settings": [TOML], "http": HTTP, "secure_step": _secure()[0], "secure_answer": _secure()[1],
    }


def write() -> None:
    for name, items in seeds().items():
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for data in items:
            (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)


if __name__ == "__main__":
    write()
