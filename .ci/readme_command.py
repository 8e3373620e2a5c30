"""Print a command of README.md verbatim, for .ci/run: the one-line ```bash block that follows the marker
``<!-- ci: NAME -->``. Fails (exit 1, saying why) if the marker is missing, repeated, or not followed by exactly
one one-line bash block, so that a README edit that breaks the quick start turns CI red instead of going
unchecked."""
import pathlib
import re
import sys


def command(readme: str, name: str) -> str:
    marker = f"<!-- ci: {name} -->"
    if readme.count(marker) != 1:
        raise SystemExit(f"README.md must hold the marker {marker!r} exactly once (found {readme.count(marker)})")
    after = readme.split(marker, 1)[1]
    match = re.match(r"\s*```bash\n(.*?)\n```", after, re.DOTALL)
    if not match:
        raise SystemExit(f"README.md: {marker!r} must be followed by a ```bash block")
    lines = [line for line in match.group(1).splitlines() if line.strip()]
    if len(lines) != 1:
        raise SystemExit(f"README.md: the block after {marker!r} must be one command line, found {len(lines)}")
    return lines[0]


if __name__ == "__main__":
    root = pathlib.Path(__file__).resolve().parents[1]
    print(command((root / "README.md").read_text(), sys.argv[1]))
