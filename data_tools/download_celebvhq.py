"""Download and slice CelebV-HQ from its metadata (celebvhq_info.json) -> clips.

    python -m data_tools.download_celebvhq --json celebvhq_info.json --out RAW/CelebV-HQ [--cache DIR]

Needs yt-dlp (``pip install yt-dlp``) and ffmpeg. Each clip keeps its CelebV-HQ id as file name and
gets a sidecar JSON (dataset, subject = YouTube id, gender from the appearance attributes, bbox,
url, time range) that ``data_tools.prepare --src RAW`` reads. Re-running skips finished clips.
"""
import argparse
import logging
import sys
from pathlib import Path

from dualforce_mega.preprocess.sources import fetch_segments, parse_celebvhq


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="celebvhq_info.json")
    ap.add_argument("--out", type=Path, required=True, help="where the clips go (e.g. RAW/CelebV-HQ)")
    ap.add_argument("--cache", type=Path, help="full downloaded videos (default OUT/../_downloads)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    status = fetch_segments(parse_celebvhq(args.json), args.out, args.cache or args.out.parent / "_downloads",
                            args.out / "download_manifest.jsonl")
    ok = sum(s == "ok" for s in status.values())
    print(f"{ok}/{len(status)} CelebV-HQ clips in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
