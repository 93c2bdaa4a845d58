"""The `dashkv` command."""
import sys


def main(argv: list[str] | None = None) -> int:
    print("dashkv: not built yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
