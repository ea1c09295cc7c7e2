"""Write the certificates of a PEM file that a CA bundle lacks, one file each.

    python3 extra_certs.py SITE.pem BUNDLE.crt OUT_DIR

Run by images/base/build.sh on the host (mmdebstrap customize hook) with the image's Debian
bundle: what a site adds to its trust store (a TLS-inspecting proxy, a private index) lands in
OUT_DIR/site-ca-<n>.crt for update-ca-certificates; what Debian already trusts is skipped.
Standard library only (the host's python3).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PEM = re.compile(r"-----BEGIN CERTIFICATE-----\s+(.*?)\s+-----END CERTIFICATE-----", re.S)


def certificates(text: str) -> list[str]:
    """The base64 bodies of the certificates in `text`, whitespace removed (the same certificate
    wrapped differently compares equal)."""
    return ["".join(body.split()) for body in PEM.findall(text)]


def pem(body: str) -> str:
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def main(site: str, bundle: str, out_dir: str) -> int:
    known = set(certificates(Path(bundle).read_text()))
    wanted = certificates(Path(site).read_text())
    if not wanted:
        print(f"{site}: no PEM certificates in it", file=sys.stderr)
        return 2
    extra = list(dict.fromkeys(b for b in wanted if b not in known))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for n, body in enumerate(extra, 1):
        (out / f"site-ca-{n}.crt").write_text(pem(body))
    print(f"site CA certificates: {len(extra)} added, {len(wanted) - len(extra)} already in Debian's bundle")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
