"""``castle-convert push DIR --repo ID``: create the Hub repo and upload the directory in one commit.

The directory is checked first (it must load: config, safetensors header, remote-code files) and
its model card validated; a card castle-convert generated is rendered again with the repo id in
its usage snippets. ``--dry-run`` stops after that and lists exactly what would be uploaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from castle_convert.export.card import MARKER, render_card_for_dir, validate_card
from castle_convert.export.load import CheckpointError, checked_config, read_config, weights_header, weights_path

REMOTE_CODE_FILES = ("configuration_castling.py", "modeling_castling.py", "modeling_castling_timm.py",
                     "castling_layers.py", "castling_functional.py", "castling_checks.py")


class PushError(RuntimeError):
    """The upload failed; the message is one line saying why and what to do."""


@dataclass
class PushPlan:
    directory: Path
    repo_id: str
    private: bool
    files: list[tuple[str, int]] = field(default_factory=list)     # (path in repo, bytes)
    readme: str = ""
    readme_rendered: bool = False
    url: Optional[str] = None
    skipped: list[str] = field(default_factory=list)                # symlinks out of the directory: not uploaded

    def format(self) -> str:
        total = sum(size for _, size in self.files)
        lines = [f"{'would upload' if self.url is None else 'uploaded'} {len(self.files)} files "
                 f"({_size(total)}) to {self.repo_id} ({'private' if self.private else 'public'}):"]
        width = max(len(p) for p, _ in self.files)
        lines += [f"  {p:<{width}}  {_size(s):>10}" for p, s in self.files]
        lines.append("model card: valid front matter" + (" (rendered for this repo id)" if self.readme_rendered
                                                          else " (kept as written)"))
        lines += [f"skipped (not uploaded): {item}" for item in self.skipped]
        if self.url:
            lines.append(f"commit: {self.url}")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise PushError(f"--repo {repo_id!r} is not a Hub repo id: use NAME or OWNER/NAME")


def plan_push(directory: Union[str, Path], repo_id: str, *, private: bool = False) -> PushPlan:
    """Check ``directory`` and list what would be uploaded (nothing is sent)."""
    from safetensors import safe_open

    directory = Path(directory)
    _check_repo_id(repo_id)
    config = read_config(directory)
    weights = weights_path(directory)
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{weights} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    checked_config(config, weights_header(weights), directory / "config.json")   # what every loader will check
    if config.get("auto_map"):
        layers = directory / "castling_layers.py"           # directories written before castling_checks.py lack it
        needed = [n for n in REMOTE_CODE_FILES if n != "castling_checks.py" or not layers.is_file()
                  or "castling_checks" in layers.read_text(errors="replace")]
        missing = [n for n in needed if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(f"{directory / missing[0]} is missing: config.json's auto_map needs "
                                  f"{', '.join(REMOTE_CODE_FILES)}")
    readme = directory / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    rendered = not text or MARKER in text
    if rendered:
        text = render_card_for_dir(directory, repo_id=repo_id)
    validate_card(text, str(readme), require_results=(directory / "report.json").is_file() and not config.get(
        "castle_headless"))
    files, skipped = [], []
    root = directory.resolve()
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or "__pycache__" in rel.parts:
            continue
        if p.is_symlink() and not p.resolve().is_relative_to(root):     # e.g. a link to /etc/passwd: never sent
            skipped.append(f"{rel.as_posix()} (a link to {os.readlink(p)}, outside the directory)")
            continue
        if p.is_dir() or not p.exists():
            continue
        files.append((rel.as_posix(), p.stat().st_size))
    files = [(r, s) for r, s in files if r != "README.md"] + [("README.md", len(text.encode()))]
    files.sort()
    return PushPlan(directory=directory, repo_id=repo_id, private=private, files=files, readme=text,
                    readme_rendered=rendered, skipped=skipped)


def _describe_failure(e: BaseException, repo_id: str) -> str:
    from huggingface_hub import constants
    endpoint = constants.ENDPOINT.split("://")[-1]
    msg = " ".join(str(e).split())[:200]
    name = type(e).__name__
    status = getattr(getattr(e, "response", None), "status_code", None)
    if name == "OfflineModeIsEnabled" or "offline mode is enabled" in msg.lower():
        return f"push failed: offline mode (HF_HUB_OFFLINE=1) is set, so {endpoint} was not contacted: unset it, " \
               "then check your network / token"
    if status in (401, 403):
        return f"push failed: {endpoint} refused the token for {repo_id} (HTTP {status}): log in with " \
               "`hf auth login` or pass --token"
    if status is not None:
        return f"push failed: {endpoint} answered HTTP {status} for {repo_id} ({msg})"
    if isinstance(e, OSError) or any(k in name for k in ("Connect", "Timeout", "Network", "Protocol")):
        return f"push failed: cannot reach {endpoint} ({name}: {msg}): check your network / token"
    return f"push failed: {name}: {msg}"


def push(directory: Union[str, Path], repo_id: str, *, private: bool = False, dry_run: bool = False,
         token: Optional[str] = None) -> PushPlan:
    """Create ``repo_id`` on the Hub (if needed) and upload ``directory`` in one commit."""
    plan = plan_push(directory, repo_id, private=private)
    if dry_run:
        return plan
    from huggingface_hub import CommitOperationAdd, HfApi

    from castle_convert import __version__
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=(plan.readme.encode() if rel == "README.md"
                                                                 else str(plan.directory / rel)))
           for rel, _ in plan.files]
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations=ops, repo_type="model",
                                 commit_message=f"Upload Castling-ViT checkpoint (castle-convert {__version__})")
    except Exception as e:  # noqa: BLE001 - network / auth / server errors: one line
        raise PushError(_describe_failure(e, repo_id)) from e
    plan.url = getattr(info, "commit_url", None) or str(info)
    return plan

