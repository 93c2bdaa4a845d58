"""Record, in evaluation rows made before rows carried it, which encoder weights their learned methods
decoded with (`encoders_sha256`), so `dashkv eval` can refuse to resume those sweeps with other weights.

    python scripts/annotate_encoder_digest.py results/eval/SWEEP ENCODER_DIR_OR_ENCODERS_JSON

The digest comes from the encoder set's encoders.json (for the default model's earlier shipped set:
`git show 845ae9b:src/dashkv/data/encoders/smollm2-135m-b64/encoders.json > /tmp/old.json`). Only rows
of learned methods without the field are touched; results are not. Run it only on a sweep no process is
appending to.
"""
import json
import sys
from pathlib import Path

LEARNED = ("dashkv", "dashkv_rerank")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    sweep, enc = Path(argv[0]), Path(argv[1])
    cfg = enc / "encoders.json" if enc.is_dir() else enc
    digest = json.loads(cfg.read_text())["sha256"]
    path = sweep / "results.jsonl"
    lines = path.read_text().splitlines()
    out, n = [], 0
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("method") in LEARNED and not row.get("encoders_sha256"):
            row["encoders_sha256"] = digest
            n += 1
        elif "encoders_sha256" not in row:
            row["encoders_sha256"] = None
        out.append(json.dumps(row))
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(out) + "\n")
    tmp.replace(path)
    print(f"{path}: {n} learned rows annotated with {digest[:12]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
