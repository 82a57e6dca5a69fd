"""python -m pipeline.models.pretrained check [--params params.yaml] [--load]"""

from __future__ import annotations

from pipeline.config import ConfigError
from pipeline.models.pretrained.check import load_world, preflight


def main(argv=None) -> None:
    import argparse

    from pipeline.config import load

    ap = argparse.ArgumentParser(description="check the pretrained models the params name (no downloads)")
    ap.add_argument("action", choices=["check"])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--load", action="store_true", help="also load the weights (slow for the real models)")
    args = ap.parse_args(argv)
    cfg = load(args.params)
    try:
        world = preflight(cfg)
        for r in (world.foundation, world.teacher, world.captioner):
            if r is not None:
                print(f"ok  {r.describe()} [{r.how}{', commit ' + r.commit if r.commit else ''}]")
        if args.load:
            load_world(cfg)
            print("ok  loaded foundation pipeline and teacher")
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
