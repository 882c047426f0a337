"""Download and slice HDTF or CelebV-HQ into clips with sidecars that ``data_tools.prepare`` reads.

    python -m data_tools.download hdtf --meta HDTF_dataset --out RAW/HDTF [--cache DIR]
    python -m data_tools.download celebvhq --meta celebvhq_info.json --out RAW/CelebV-HQ [--cache DIR]

HDTF's ``--meta`` is the ``HDTF_dataset`` folder of github.com/MRzzm/HDTF (``*_video_url.txt`` +
``*_annotion_time.txt``); CelebV-HQ's is its ``celebvhq_info.json``. Needs yt-dlp
(``pip install yt-dlp``) and ffmpeg. Re-running skips finished clips; dead links are reported in
``<out>/download_manifest.jsonl``. See docs/DATA.md.
"""
import argparse
import logging
import sys
from pathlib import Path

from dualforce_mega.cli import run_main
from dualforce_mega.fsutil import refuse_overlap
from dualforce_mega.preprocess.sources import fetch_segments, parse_celebvhq, parse_hdtf

PARSERS = {"hdtf": parse_hdtf, "celebvhq": parse_celebvhq}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", choices=sorted(PARSERS))
    ap.add_argument("--meta", type=Path, required=True, help="HDTF_dataset folder or celebvhq_info.json")
    ap.add_argument("--out", type=Path, required=True, help="where the clips go (e.g. RAW/HDTF)")
    ap.add_argument("--cache", type=Path, help="full downloaded videos (default OUT/../_downloads)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refuse_overlap({"--out": args.out, "--cache": args.cache}, {"--meta": args.meta})
    status = fetch_segments(PARSERS[args.dataset](args.meta), args.out, args.cache or args.out.parent / "_downloads",
                            args.out / "download_manifest.jsonl")
    ok = sum(s == "ok" for s in status.values())
    print(f"{ok}/{len(status)} {args.dataset} clips in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
