"""List the GPU code a built shared library carries, without cuobjdump (the toolkit here ships none).

nvcc embeds each translation unit's device code as a fat binary: a 16-byte container header (magic
``0xBA55ED50``, version ``u16``, header size ``u16``, size of the entries ``u64``), then entries, each with its
own header: kind ``u16`` (1 = PTX, 2 = ELF cubin), ``u16``, header size ``u32``, payload size ``u64``, ...,
and the target architecture ``u32`` at byte 28 (``90`` for sm_90). The payload follows the entry header, and
may be compressed; the headers never are. (Layout as documented by reverse-engineering projects, e.g.
``nvopen-tools/fatbin/FORMAT_SPECIFICATION.md``, and checked here against nvcc 13.0 builds.)

    python -m build_support.fatbin fastjac/_C*.so            # prints e.g. "sm_80 sm_90"
    python -m build_support.fatbin fastjac/_C*.so --require 80,90
"""
from __future__ import annotations

import argparse
import struct
import sys

MAGIC = struct.pack("<I", 0xBA55ED50)
KINDS = {1: "ptx", 2: "sm"}


def architectures(data: bytes) -> set[tuple[str, int]]:
    """``{("sm", 80), ("ptx", 90), ...}``: the kind and architecture of every fat-binary entry in ``data``."""
    found = set()
    start = data.find(MAGIC)
    while start != -1:
        if start + 16 <= len(data):
            version, header_size, size = struct.unpack_from("<HHQ", data, start + 4)
            end = min(start + header_size + size, len(data))
            entry = start + header_size
            while version == 1 and entry + 32 <= end:
                kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
                (arch,) = struct.unpack_from("<I", data, entry + 28)
                if kind not in KINDS or entry_header < 32:
                    break
                found.add((KINDS[kind], arch))
                entry += entry_header + payload
        start = data.find(MAGIC, start + 4)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library")
    parser.add_argument("--require", default="", help="comma-separated sm versions that must be present")
    args = parser.parse_args(argv)
    with open(args.library, "rb") as handle:
        found = architectures(handle.read())
    print(" ".join(f"{kind}_{arch}" for kind, arch in sorted(found)) or "no GPU code")
    missing = [a for a in filter(None, args.require.split(",")) if ("sm", int(a)) not in found]
    if missing:
        print(f"{args.library} lacks GPU code for " + ", ".join(f"sm_{a}" for a in missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
