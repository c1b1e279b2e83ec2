"""Profile a Granite-4.0-H hybrid (Mamba2 + attention): prefill per Mamba scan path, time per layer kind, state memory.

Random weights. Four measurements (--sections picks them; all by default), written to one JSON file under
--output_dir and summarized on stdout:

  prefill  no-cache forward (logits for the last token only) at each batch x context, once per scan path:
           fast (our Triton SSD scan, fms/triton/ssd_scan.py, with fla's conv and norm when installed; CUDA
           only), reference (chunked PyTorch), recurrent (ssd_step per token);
           median ms over --repeats after --warmup, and the speedups of fast over the other two.
  split    one prefill and one decode step (paged cache by default) timed per layer kind: forward hooks on the
           mixers sum the Mamba and attention time; other = total - both (embedding, MLPs, norms, LM head).
  memory   Mamba state bytes per sequence vs KV bytes per token, from model.cache_spec().
  mixer    ONE Mamba2 mixer of the variant's shape, alone, once per scan path at each batch x context: the scan
           function by itself on random inputs of the mixer's shapes, and mixer(hidden) [b, T, H] (no state);
           each timed eagerly (one call, --warmup then --repeats) and, on CUDA, as one replay of the call
           captured in a CUDA graph (no launch overhead: GPU time only); speedups of fast over the other two.
           The whole-model prefill at batch 1 is bound by the host's launches; this is the scan kernels' figure.
           Needs no model: with --sections mixer alone the 40-layer model is not built.

    python scripts/profile_hybrid.py                                  # CUDA: 4.0-h-1b bf16, contexts 512..16384
    python scripts/profile_hybrid.py --device cpu --variant h-micro-test --dtype fp32
    python scripts/profile_hybrid.py --sections mixer --batch_sizes 1,8 --context_lengths 1024,4096,16384 \
        --max_recurrent_context 2048                                  # the Mamba mixer and its scan alone

The work is fms.bench.hybrid (sections in fms.bench.hybrid_sections and fms.bench.hybrid_mixer).
"""


import argparse
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fms.bench.hybrid import SECTIONS, HybridProfileConfig, run_hybrid_profile
from fms.bench.ssd import DTYPES, PATHS
from fms.cache.paged import SUPPORTED_PAGE_SIZES


def _int_list(text: str) -> list[int]:
    return [int(part) for part in str(text).replace(",", " ").split()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", default="4.0-h-1b", help="a granite_hybrid variant with Mamba layers")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--context_lengths", default=None,
                   help="comma list; default 512,...,16384 on CUDA, 32,64 on the CPU")
    p.add_argument("--batch_sizes", default="1", help="comma list")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma list of Mamba scan paths from {PATHS}")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of measurements from {SECTIONS}")
    p.add_argument("--max_recurrent_context", type=int, default=4096,
                   help="the recurrent path only runs up to this context (it is slow)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    p.add_argument("--attn_name", default="paged", help="attention op of the decode step's cache")
    p.add_argument("--prefill_attn_name", default="sdpa", help="attention op of the no-cache prefill")
    p.add_argument("--page_size", type=int, default=16, choices=SUPPORTED_PAGE_SIZES)
    p.add_argument("--no_split", action="store_true",
                   help="skip the per-layer-kind split (as leaving split out of --sections)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="results/profile_hybrid")
    p.add_argument("--run_name", default=None, help="JSON file name without .json (default: variant-dtype-time)")
    return p


def config_from_args(parser: argparse.ArgumentParser, argv: list[str]) -> HybridProfileConfig:
    args = parser.parse_args(argv)
    try:
        batch_sizes = _int_list(args.batch_sizes)
        contexts = None if args.context_lengths is None else _int_list(args.context_lengths)
    except ValueError as exc:
        parser.error(f"--batch_sizes / --context_lengths take comma-separated integers: {exc}")
    options = dict(vars(args), batch_sizes=batch_sizes, context_lengths=contexts, paths=_names(args.paths),
                   sections=_names(args.sections))
    try:
        return HybridProfileConfig(**options, command=" ".join(
            shlex.quote(a) for a in ["scripts/profile_hybrid.py", *argv]))
    except ValueError as exc:
        parser.error(str(exc))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_hybrid_profile(config_from_args(build_parser(), argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
