"""export.push to S3 vs a plain s3fs upload of the same files, against moto's S3 server on loopback.

Lays out an export as the export worker publishes it (model shards of --shard-size, tokenizer and
config files, a model card, metadata.json), starts moto in server mode on 127.0.0.1, and measures
in the same run, alternating, best of --repeat:

  ours   finetune_worker.export.push.push_s3 into a fresh prefix (metadata.json last, the old
         marker check, the listing for idempotence)
  plain  s3fs.S3FileSystem.put(<export>/, <prefix>, recursive=True) of the same files

and prints push throughput ours / plain (goal >= 0.9).

    python bench/bench_push.py [--shards 2] [--shard-size 128MB] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "operator"), str(REPO / "tests")]


def layout(root: Path, shards: int, shard_bytes: int) -> Path:
    export = root / "export"
    st = export / "sentence-transformers"
    (st / "1_Pooling").mkdir(parents=True)
    for i in range(shards):
        with (st / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").open("wb") as f:
            for _ in range(shard_bytes // (4 * 2**20)):
                f.write(os.urandom(4 * 2**20))
    for name, size in (("tokenizer.json", 700_000), ("vocab.txt", 230_000), ("config.json", 700),
                       ("1_Pooling/config.json", 300), ("modules.json", 350), ("README.md", 2_000)):
        (st / name).write_bytes(os.urandom(size))
    (export / "metadata.json").write_text(json.dumps({"fingerprint": "bench", "files": {}}))
    return export


def main() -> None:
    from finetune_api.fields import parse_size

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--shard-size", default="128MB")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from finetune_worker.export.push import push_s3
    from remotekit import S3_KEYS, make_bucket, moto_s3, s3fs_for

    with tempfile.TemporaryDirectory() as tmp, moto_s3() as endpoint:
        export = layout(Path(tmp), args.shards, parse_size(args.shard_size, "--shard-size"))
        total = sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
        os.environ.update({**S3_KEYS, "AWS_ENDPOINT_URL": endpoint})
        make_bucket(endpoint, "bench")
        plain_fs = s3fs_for(endpoint)
        times: dict[str, list[float]] = {"ours": [], "plain": []}
        for i in range(args.repeat):
            t0 = time.perf_counter()
            push_s3(export, f"s3://bench/ours-{i}/", {"fingerprint": "bench"}, lambda _where: None)
            times["ours"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plain_fs.put(str(export) + "/", f"bench/plain-{i}/", recursive=True)
            times["plain"].append(time.perf_counter() - t0)
            for who in ("ours", "plain"):  # a fresh prefix each time; drop the old one (moto keeps it in memory)
                plain_fs.rm(f"bench/{who}-{i}/", recursive=True)
        ours, plain = min(times["ours"]), min(times["plain"])
        mb = total / 1e6
        print(f"export: {args.shards} shards of {args.shard_size}, {mb:.0f} MB in all; best of {args.repeat}")
        print(f"ours  (push_s3, metadata.json last): {ours:.2f}s  {mb / ours:.0f} MB/s")
        print(f"plain (s3fs put, recursive):         {plain:.2f}s  {mb / plain:.0f} MB/s")
        print(f"push throughput ours / plain = {plain / ours:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
