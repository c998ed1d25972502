"""Where a result file came from: the command, the machine, the versions, the date and the seed.

Every CSV the report writes starts with ``# key: value`` lines (:meth:`Provenance.header_lines`,
the same shape as the Stripes CSVs), and ``results/README.md`` keeps one section per file
(:func:`merge_readme`). Sections belong to whoever wrote them: the report rewrites only the
sections of the files it produced in this run and keeps every other section as it was, so the
entries of other stages (``stripes/``, ``kernels.csv``, ...) survive a report run. A file that
has no section yet gets one drafted from its own ``# command:`` header when it has one.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from releq_tvm.machine import cpu_model


def package_version(name: str) -> str:
    """Installed version of a distribution without importing it (importing TVM takes seconds)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class Provenance:
    """What made a result: the command that rebuilds it, on which machine, with which versions."""

    command: str
    seed: str = "0"
    machine: str = field(default_factory=platform.platform)
    cpu: str = field(default_factory=cpu_model)
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    python: str = field(default_factory=lambda: sys.version.split()[0])
    tvm: str = field(default_factory=lambda: package_version("apache-tvm"))
    torch: str = field(default_factory=lambda: package_version("torch"))
    numpy: str = field(default_factory=lambda: package_version("numpy"))
    made: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    @property
    def versions(self) -> str:
        from releq_tvm import __version__

        return (
            f"releq-tvm {__version__}; python {self.python}; tvm {self.tvm}; torch {self.torch}; numpy {self.numpy}"
        )

    def header_lines(self, notes: Sequence[str] = ()) -> list[str]:
        """``# key: value`` lines heading a CSV (read it with ``pandas.read_csv(path, comment="#")``)."""
        return [
            f"# command: {self.command}",
            f"# machine: {self.machine}; cpu: {self.cpu}; cores: {self.cores}",
            f"# versions: {self.versions}",
            f"# made: {self.made}; seed: {self.seed}",
            *(f"# note: {n}" for n in notes),
        ]

    def readme_lines(self) -> list[str]:
        """The provenance bullet list of a README section."""
        return [
            f"- command: `{self.command}`",
            f"- machine: {self.machine}; CPU: {self.cpu}; {self.cores} cores",
            f"- versions: {self.versions}",
            f"- made: {self.made}; seed: {self.seed}",
        ]


# ---------------------------------------------------------------- results/README.md

_BEGIN = re.compile(r"^<!-- begin: (?P<name>.+?) -->$")
_END = "<!-- end: {name} -->"

README_PREAMBLE = """# results/

Every file under `results/` with the command that made it, the machine, the versions and the
date. Sections are kept per file: a stage rewrites the sections of the files it writes and
leaves the others alone (entries marked "generated from the file itself" are refreshed from the
file's own `#` header on every report run).

The report's files (`fig8_tvm_cpu`, `fig9_stripes`, `bitwidths`, `pareto_<net>`,
`admm_comparison`, and from search runs `convergence_<net>`, `reward_ablation`,
`clip_sensitivity`) are rebuilt together, all or nothing, from the repository root in the
project venv:

    releq-tvm report --out results --threads 1                 # published bits, all networks
    releq-tvm report --bits-from RUN_DIR [--bits-from published] --out results

- Means over networks (`GEOMEAN` rows) are geometric means: the quantities are ratios.
- CPU numbers need no data; they are measured once per machine, bits and repeats and cached
  (namespace `report/cpu_latency` of the cache store, `~/.cache/releq-tvm/cache.sqlite` by default;
  `--fresh-cpu` re-measures; each row says when it was measured). `--skip-cpu` leaves the
  CPU files as they are.
- Accuracies are measured here: MNIST networks always (LeNet-5 from its shipped checkpoint,
  the 4-layer LeNet trained by the report, seeded, and cached); CIFAR-10, SVHN and ImageNet
  networks need `--data-dir DIR --checkpoint NET=FILE`, and their cells say so until then.
- Pareto points are scored without fine-tuning (hundreds of points; `--pareto-finetune-steps`
  adds a short fine-tune per point); the placed points also carry their long fine-tune's test
  accuracy.

CSV files start with `#` lines (command, machine, versions, date, seed, notes); read them with
`pandas.read_csv(path, comment="#")`.
"""


def parse_readme(text: str) -> tuple[str, dict[str, str]]:
    """Split a README into its preamble and ``{file name: section body}`` (markers excluded)."""
    preamble: list[str] = []
    sections: dict[str, str] = {}
    current: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        match = _BEGIN.match(line.strip())
        if current is None and match:
            current, body = match.group("name"), []
        elif current is not None and line.strip() == _END.format(name=current):
            sections[current] = "\n".join(body).strip("\n")
            current = None
        elif current is not None:
            body.append(line)
        else:
            preamble.append(line)
    if current is not None:  # an unterminated section is kept, not dropped
        sections[current] = "\n".join(body).strip("\n")
    return "\n".join(preamble).strip("\n"), sections


def render_readme(preamble: str, sections: Mapping[str, str]) -> str:
    """The README text: preamble, then one marked section per file in path order."""
    parts = [preamble.rstrip("\n"), ""]
    for name in sorted(sections, key=_section_order):
        parts += [f"<!-- begin: {name} -->", sections[name].strip("\n"), _END.format(name=name), ""]
    return "\n".join(parts)


def _section_order(name: str) -> tuple[int, str]:
    # Top-level files first, then folders, each alphabetically: the order a reader browses in.
    return (name.count("/"), name)


def header_provenance(path: Path) -> list[str]:
    """The ``# key: value`` lines at the top of a text file (empty when it has none)."""
    lines = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.startswith("#"):
                    break
                lines.append(line[1:].strip())
    except (OSError, UnicodeDecodeError):
        return []
    return lines


#: First line of a section drafted from a file's header: such sections are re-drafted on every
#: merge (the file may have been rewritten since), all others belong to their author.
DRAFTED = "Written by another stage; this entry is generated from the file itself."


def drafted_section(name: str, path: Path) -> str | None:
    """A section for a file another stage wrote, from its own ``# command:`` header (None: no header)."""
    header = header_provenance(path)
    if not any(h.startswith("command:") for h in header):
        return None
    lines = [f"### `{name}`", "", DRAFTED]
    for h in header:
        key, _, value = h.partition(":")
        if key in ("command", "machine", "versions", "made"):
            lines.append(f"- {key}: `{value.strip()}`" if key == "command" else f"- {key}: {value.strip()}")
    return "\n".join(lines)


def merge_readme(
    existing: str | None,
    updates: Mapping[str, str],
    results_dir: Path | None = None,
    extra_files: Iterable[str] = (),
) -> str:
    """Merge ``updates`` (file name -> section body) into the README text ``existing``.

    The preamble is the report's (:data:`README_PREAMBLE`); sections not in ``updates`` are
    kept untouched. With ``results_dir``, every file found under
    it (plus ``extra_files``, names relative to it) that has no section yet gets one: drafted from
    its ``# command:`` header, or a pointer to the README of its folder when that folder has one.
    Drafted sections are re-drafted each time, so they follow the file's current header.
    """
    _, sections = parse_readme(existing or "")
    preamble = README_PREAMBLE  # the folder's introduction belongs to the report, like its files
    sections.update(updates)
    if results_dir is not None:
        names = set(extra_files)
        for path in sorted(Path(results_dir).rglob("*")):
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(results_dir).parts):
                names.add(path.relative_to(results_dir).as_posix())
        stale = {n for n, body in sections.items() if DRAFTED in body and n not in updates}
        for name in sorted((names - set(sections) | stale) - {"README.md"}):
            section = _section_for_foreign_file(name, Path(results_dir))
            if section is not None:
                sections[name] = section
            elif name in stale:  # the file is gone: its drafted section goes too
                del sections[name]
    return render_readme(preamble, sections)


def _section_for_foreign_file(name: str, results_dir: Path) -> str | None:
    path = results_dir / name
    folder_readme = path.parent / "README.md"
    if path.name == "README.md":
        return f"### `{name}`\n\nHow the files of `{Path(name).parent.as_posix()}/` were made (written by their stage)."
    drafted = drafted_section(name, path) if path.is_file() else None
    if drafted is not None:
        return drafted
    sibling = path.with_suffix(".csv")
    if path.suffix == ".png" and sibling.is_file():
        # a plot written next to its CSV by the same command carries the CSV's provenance
        drafted = drafted_section(name, sibling)
        if drafted is not None:
            return drafted.replace(DRAFTED, f"{DRAFTED} Plot of `{sibling.name}`; provenance from its header.", 1)
    if folder_readme.is_file() and folder_readme != results_dir / "README.md":
        rel = folder_readme.relative_to(results_dir).as_posix()
        return f"### `{name}`\n\nSee `{rel}` for the command and provenance."
    if path.is_file():
        # Listed even without provenance, so the README names every file; the stage that wrote
        # it replaces this section with its own (drafted sections are rewritten on every merge).
        return f"### `{name}`\n\n{DRAFTED}\n- no `# command:` header in the file: its stage has not documented it yet"
    return None
