"""Download a model's tokenizer files from the Hugging Face hub into a local folder."""

import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

# Set before huggingface_hub is imported (it reads them at import): an
# unreachable hub should fail in seconds, not after the default 10 s per file.
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "15")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

DEFAULT_REPO = "meta-llama/Llama-2-7b-hf"
# At least one of these must exist; Llama-2 has both, Llama-3 / Granite only tokenizer.json.
MODEL_FILES = ("tokenizer.model", "tokenizer.json")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class DownloadError(Exception):
    """A failure the user can fix; its message says how."""


def _by_hand(repo: str, out: Path) -> str:
    return f"or copy tokenizer.model (or tokenizer.json) from https://huggingface.co/{repo} into {out} by hand"


def download(repo: str, out: Path, token: str | None) -> list[Path]:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hf_logging
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise DownloadError(f"huggingface_hub is not installed: pip install huggingface_hub, {_by_hand(repo, out)}")

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not offline:
        # huggingface_hub retries a refused connection five times with backoff
        # (about 25 s) and logs each try; one short probe fails fast instead.
        _check_reachable(repo, out)
        hf_logging.set_verbosity_error()
    written = []
    for filename in MODEL_FILES + CONFIG_FILES:
        try:
            written.append(Path(hf_hub_download(repo, filename, local_dir=out, token=token, etag_timeout=5)))
        except RemoteEntryNotFoundError:
            continue  # this repo simply does not ship that file
        except GatedRepoError:
            hint = "HF_TOKEN is set but its account has not been granted access" if token else "HF_TOKEN is not set"
            raise DownloadError(
                f"{repo} is gated ({hint}): accept the license at https://huggingface.co/{repo}, "
                f"export HF_TOKEN=<a read token from https://huggingface.co/settings/tokens>, {_by_hand(repo, out)}"
            )
        except RepositoryNotFoundError:
            raise DownloadError(
                f"{repo} was not found on the hub (or is private and "
                f"{'HF_TOKEN cannot see it' if token else 'HF_TOKEN is not set'}): check --repo, {_by_hand(repo, out)}"
            )
        except RevisionNotFoundError as exc:
            raise DownloadError(f"{repo}: {_first_line(exc)}")
        except LocalEntryNotFoundError:
            # Raised both in offline mode and when the hub cannot be reached
            # and the file is not already cached.
            reason = "HF_HUB_OFFLINE is set" if offline else f"could not reach {_endpoint()}"
            raise DownloadError(
                f"cannot download {filename} from {repo}: {reason}. Connect to the internet "
                f"(and unset HF_HUB_OFFLINE), {_by_hand(repo, out)}"
            )
        except HfHubHTTPError as exc:
            raise DownloadError(f"the hub refused {repo}/{filename}: {_first_line(exc)}; {_by_hand(repo, out)}")
        except Exception as exc:
            # Connection drops and timeouts mid-download surface as the HTTP
            # client's own exception types, which vary by huggingface_hub version.
            raise DownloadError(
                f"cannot download {filename} from {repo} via {_endpoint()}: {type(exc).__name__}: "
                f"{_first_line(exc)}; retry, {_by_hand(repo, out)}"
            )
    if not any(path.name in MODEL_FILES for path in written):
        raise DownloadError(f"{repo} has neither {' nor '.join(MODEL_FILES)}: is it a model repo? {_by_hand(repo, out)}")
    return written


def _check_reachable(repo: str, out: Path) -> None:
    request = urllib.request.Request(_endpoint(), method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=5).close()
    except urllib.error.HTTPError:
        pass  # any HTTP answer means the hub is reachable
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(
            f"cannot reach the hub at {_endpoint()} ({reason}): connect to the internet (or set HF_ENDPOINT "
            f"to a reachable mirror), {_by_hand(repo, out)}"
        )


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", default=DEFAULT_REPO, help=f"hub repo id (default {DEFAULT_REPO})")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default tokenizers/<repo name>)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else Path("tokenizers") / args.repo.rstrip("/").split("/")[-1]

    try:
        written = download(args.repo, out, os.environ.get("HF_TOKEN") or None)
    except DownloadError as exc:
        print(f"download_tokenizer: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    print(f"load with fms.utils.tokenizers.get_tokenizer({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
