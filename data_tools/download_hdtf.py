"""Download and slice HDTF: the annotation files of github.com/MRzzm/HDTF (HDTF_dataset/) -> clips.

    python -m data_tools.download_hdtf --annotations HDTF_dataset --out RAW/HDTF [--cache DIR]

Needs yt-dlp (``pip install yt-dlp``) and ffmpeg. Every annotated range becomes
``<group>_<Name>_<k>.mp4`` with a sidecar JSON (dataset, subject, url, time range) that
``data_tools.prepare --src RAW`` reads. Re-running skips finished clips; dead links are reported in
``<out>/download_manifest.jsonl``.
"""
import argparse
import logging
import sys
from pathlib import Path

from dualforce_mega.preprocess.sources import fetch_segments, parse_hdtf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--annotations", type=Path, required=True, help="HDTF_dataset folder (url + annotion_time files)")
    ap.add_argument("--out", type=Path, required=True, help="where the clips go (e.g. RAW/HDTF)")
    ap.add_argument("--cache", type=Path, help="full downloaded videos (default OUT/../_downloads)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    segments = parse_hdtf(args.annotations)
    status = fetch_segments(segments, args.out, args.cache or args.out.parent / "_downloads",
                            args.out / "download_manifest.jsonl")
    ok = sum(s == "ok" for s in status.values())
    print(f"{ok}/{len(status)} HDTF clips in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
