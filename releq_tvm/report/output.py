"""All-or-nothing report output: files are staged in a hidden folder and moved in only at the end.

A report writes many files; if a network fails halfway (a build error, a missing dataset, a
Ctrl-C), the files already in ``results/`` must stay whole and mutually consistent. So every
file is written into ``<out>/.report-staging-*`` first (same filesystem, so the final
``os.replace`` is atomic per file), ``results/README.md`` is merged last, and nothing in
``<out>`` is touched until every file of the run exists.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from releq_tvm.io import atomic_write_bytes, atomic_write_text
from releq_tvm.report.provenance import Provenance, merge_readme


STAGING_PREFIX = ".report-staging-"


def remove_orphaned_staging(out_dir: Path) -> None:
    """Delete staging folders left by a report that was killed (its process no longer exists)."""
    for path in out_dir.glob(f"{STAGING_PREFIX}*"):
        pid_text = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


class StagedOutput:
    """Collect a report's files and README sections; :meth:`commit` moves them into ``out_dir``.

    Use as a context manager: leaving the block with an exception discards the staged files and
    leaves ``out_dir`` exactly as it was.
    """

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_orphaned_staging(self.out_dir)
        self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.out_dir))
        self.files: list[str] = []
        self.sections: dict[str, str] = {}
        self.committed = False

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.committed:
            self.discard()

    def _staged(self, name: str) -> Path:
        if name in self.files:
            raise ValueError(f"{name} staged twice in one report")
        self.files.append(name)
        return self.staging / name

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self._staged(name), text)

    def write_bytes(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self._staged(name), data)

    def document(self, name: str, title: str, provenance: Provenance, lines: Sequence[str] = ()) -> None:
        """The README section of ``name``: a title, what it shows, and its provenance."""
        body = [f"### `{name}`: {title}", "", *lines, *([""] if lines else []), *provenance.readme_lines()]
        self.sections[name] = "\n".join(body)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def commit(self) -> list[Path]:
        """Move every staged file into ``out_dir`` (each replace atomic), README last; returns the paths."""
        readme = self.out_dir / "README.md"
        existing = readme.read_text(encoding="utf-8") if readme.is_file() else None
        # The README must list files already there and the ones about to arrive.
        merged = merge_readme(existing, self.sections, self.out_dir, extra_files=self.files)
        atomic_write_text(self.staging / "README.md", merged)
        written = []
        for name in [*self.files, "README.md"]:
            target = self.out_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / name, target)
            written.append(target)
        self.committed = True
        self.discard()
        return written
