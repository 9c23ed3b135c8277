"""Generate every bundle under ``bundles/`` from the shared template and one method's own files.

- ``bundles/template/``: what every bundle shares: configs, ``logging.conf``, LICENSE, the data licence and the
  common ``scripts/`` modules.
- ``bundles/methods/<method>/``: what is the method's own: ``method.json`` (its registry entry, read by
  ``scripts/methods.py``), config fragments named like the template's configs, configs of its own, its ``scripts/``
  module(s) and its ``docs/``.

A method's fragment is merged into the template's config of the same name with the semantics of
``monai.bundle.ConfigParser.load_config_files``: each fragment key replaces that id whole, and a ``#`` path
(``train#trainer#prepare_batch``) replaces one nested item; lists are replaced, never merged. So that configs still
read top to bottom, a new top-level id is placed after the id that precedes it in the fragment (the fragment's first
id, if new, after ``backbones``, or at the end of a config without one); a fragment key ``"_after_": "<id>"`` places the
ids that follow it after that template id instead, without restating it. Every other method file is copied as it
is. Each generated file carries a header naming its sources; ``--check`` writes nothing and exits 1 on drift (a test runs it).

    python scripts/generate_bundles.py            # regenerate bundles/<bundle>/ for every method
    python scripts/generate_bundles.py --check    # report generated files that differ from their sources
    python scripts/generate_bundles.py --stack segresnet_vae selfreg --out DIR   # two methods on one backbone

``--stack`` merges several methods' fragments in the given order into one bundle (not committed, not drift-checked).
A method stacks when its train.json fragment only adds regularisers (``regularisers#<name>``,
``regulariser_weights#<name>``) and the ids they need; one that replaces ``loss``, ``train``, ``train#trainer`` or ``network``
(SemSim's semi-supervised step) is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.reference_resolver import ReferenceResolver

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "bundles" / "template"
METHODS = REPO / "bundles" / "methods"
TOOL = "scripts/generate_bundles.py"
# Where the fragment's first new top-level id goes when no id precedes it.
DEFAULT_ANCHOR = "backbones"
# A fragment key whose value names the template id after which the fragment's following new ids go.
AFTER_KEY = "_after_"
# The id of the header in generated JSON: a plain string, inert in any config.
JSON_HEADER_KEY = "_generated_"
REGISTRY_FILE = "method.json"
METADATA = Path("configs/metadata.json")


def sources_line(sources: Iterable[Path]) -> str:
    names = " + ".join(str(s.relative_to(REPO)) for s in sources)
    return f"Generated from {names} by {TOOL}: edit those, not this file."


def with_header(path: Path, text: str, sources: list[Path]) -> str:
    """``text`` with the header that names its ``sources``, in the comment syntax of ``path``'s type."""
    line = sources_line(sources)
    if path.suffix == ".py" or path.suffix == ".conf":
        return f"# {line}\n{text}"
    if path.suffix == ".md":
        return f"<!-- {line} -->\n{text}"
    return f"{line}\n\n{text}"


def merge(template: Mapping[str, Any], fragment: Mapping[str, Any]) -> dict[str, Any]:
    """``template`` updated by ``fragment`` as ``ConfigParser.load_config_files`` updates one config by the next,
    with new top-level ids placed after the id that precedes them in the fragment (or that ``_after_`` names)."""
    parser = ConfigParser(json.loads(json.dumps(template)))
    anchor = DEFAULT_ANCHOR
    placement: dict[str, str] = {}
    for key, value in fragment.items():
        if key == AFTER_KEY:
            if value not in template:
                raise SystemExit(f'"{AFTER_KEY}": "{value}" names no id of the template config; ids: {list(template)}')
            anchor = value
            continue
        value = json.loads(json.dumps(value))
        top = ReferenceResolver.split_id(key)[0]
        if key in parser.config:
            parser.config[key] = value
            top = key
        elif top in parser.config or ReferenceResolver.split_id(key) == [key]:
            parser[key] = value
        else:  # an overlay's flat id ("train#sampler"): the ids merge when the user's files are loaded together
            parser.config[key] = value
            top = key
        if top not in template and top not in placement:
            placement[top] = anchor
        anchor = top
    return place(parser.config, placement)


def place(config: dict[str, Any], placement: Mapping[str, str]) -> dict[str, Any]:
    """``config`` with each new id of ``placement`` moved right after its anchor (chains keep fragment order)."""
    after: dict[str, list[str]] = {}
    for key, anchor in placement.items():
        after.setdefault(anchor, []).append(key)
    ordered: dict[str, Any] = {}

    def put(key: str) -> None:
        ordered[key] = config[key]
        for follower in after.get(key, []):
            put(follower)

    for key in config:
        if key not in placement or placement[key] not in config:  # no anchor in this config: at the end
            put(key)
    return ordered


def json_text(config: Mapping[str, Any], sources: list[Path]) -> str:
    return json.dumps({JSON_HEADER_KEY: sources_line(sources), **config}, indent=4, ensure_ascii=False) + "\n"


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path.relative_to(REPO)}: not valid JSON ({error}); fix it and rerun {TOOL}") from error


def methods() -> list[Path]:
    return sorted(p for p in METHODS.iterdir() if (p / REGISTRY_FILE).is_file())


def bundle_dir(method: Path) -> Path:
    return REPO / "bundles" / read_json(method / REGISTRY_FILE)["bundle"]


def expected_files(*methods: Path) -> dict[Path, str]:
    """Every file of the bundle of ``methods`` (one method, or several stacked in order), relative to the bundle
    folder -> its text. Each method's config fragments merge, in order, into the template's config of the same name
    (or into the previous method's config of its own); their other files are copied; two methods' ``.md`` files of
    one name are joined in order, any other clash is refused."""
    files: dict[Path, str] = {}
    template_files = {p.relative_to(TEMPLATE): p for p in TEMPLATE.rglob("*") if p.is_file()}
    method_files: list[dict[Path, Path]] = [
        {
            p.relative_to(method): p
            for p in method.rglob("*")
            if p.is_file() and p.name != REGISTRY_FILE and "__pycache__" not in p.parts
        }
        for method in methods
    ]
    rels = list(template_files) + [rel for own in method_files for rel in own if rel not in template_files]
    for rel in dict.fromkeys(rels):
        if "__pycache__" in rel.parts:
            continue
        base = template_files.get(rel)
        fragments = [own[rel] for own in method_files if rel in own]
        if rel.suffix == ".json":
            sources = [base] if base is not None else []
            config = read_json(base) if base is not None else None
            for fragment in fragments:
                config = read_json(fragment) if config is None else merge(config, read_json(fragment))
                sources.append(fragment)
            if rel == METADATA:  # a method's metadata (name, description, references) lives in its method.json
                for method in methods:
                    entry = read_json(method / REGISTRY_FILE)
                    if "metadata" in entry:
                        config = merge(config, entry["metadata"])
                        sources.append(method / REGISTRY_FILE)
            files[rel] = json_text(config, sources)
        elif base is not None and fragments:
            raise SystemExit(f"{fragments[0].relative_to(REPO)} would replace the template's {rel}: only JSON configs "
                             "are merged; change the template, or give the method's file another name")
        elif base is not None:
            files[rel] = with_header(rel, base.read_text(), [base])
        elif len(fragments) > 1 and rel.suffix != ".md":
            names = ", ".join(str(f.relative_to(REPO)) for f in fragments)
            raise SystemExit(f"{names}: the stacked methods both have {rel}; rename one of them")
        else:
            files[rel] = with_header(rel, "\n".join(f.read_text() for f in fragments), fragments)
    return files


# The ids a method replaces when it changes how the network is trained, not only what is added to the loss: such a
# method has its own loss or training step and does not stack (SemSim: a semi-supervised training step).
NOT_STACKABLE_IDS = ("loss", "train", "train#trainer", "network")


def check_stackable(method: Path) -> None:
    """Refuse a method whose train.json fragment replaces the loss, the trainer or the trained network: its terms
    are not regularisers of the template's RegularisedLoss, so they cannot be added to another method's."""
    fragment = method / "configs" / "train.json"
    replaced = [key for key in (read_json(fragment) if fragment.is_file() else {}) if key in NOT_STACKABLE_IDS]
    if replaced:
        raise SystemExit(
            f"{method.name} cannot be stacked: its configs/train.json replaces {replaced} (its own loss or training "
            "step), where a stackable method only adds regularisers#<name> and regulariser_weights#<name> to the "
            "template's RegularisedLoss. See the developer notes in README.md"
        )


def generate_stack(method_names: Iterable[str], out_dir: Path) -> dict[Path, str]:
    """Write the bundle of several methods stacked on one backbone into ``out_dir``: the template plus each
    method's files in the given order (``segresnet_vae selfreg``: SelfReg's regulariser on the VAE's network).
    Returns the files written, relative to ``out_dir``."""
    names = list(method_names)
    if len(set(names)) != len(names) or not names:
        raise SystemExit(f"--stack needs distinct method names, got {names}")
    available = {m.name: m for m in methods()}
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"no method {unknown} under {METHODS.relative_to(REPO)}; methods: {sorted(available)}")
    chosen = [available[n] for n in names]
    if len(chosen) > 1:
        for method in chosen:
            check_stackable(method)
    files = expected_files(*chosen)
    out_dir = Path(out_dir)
    for rel, text in files.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def drift() -> list[str]:
    """Generated files that are missing, differ from their sources, or have no source (stale)."""
    problems = []
    for method in methods():
        bundle = bundle_dir(method)
        expected = expected_files(method)
        for rel, text in expected.items():
            path = bundle / rel
            if not path.is_file():
                problems.append(f"missing: {path.relative_to(REPO)}")
            elif path.read_text() != text:
                problems.append(f"out of date: {path.relative_to(REPO)}")
        for path in bundle.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.relative_to(bundle) not in expected \
                    and path.relative_to(bundle).parts[0] in ("configs", "scripts", "docs", "LICENSE"):
                problems.append(f"no source: {path.relative_to(REPO)}")
    return problems


def write() -> None:
    for method in methods():
        bundle = bundle_dir(method)
        expected = expected_files(method)
        for rel, text in expected.items():
            path = bundle / rel
            if not path.is_file() or path.read_text() != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(REPO)}")
        for path in bundle.rglob("*"):
            rel = path.relative_to(bundle)
            if path.is_file() and "__pycache__" not in path.parts and rel not in expected \
                    and rel.parts[0] in ("configs", "scripts", "docs", "LICENSE"):
                path.unlink()
                print(f"removed {path.relative_to(REPO)} (no source)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report generated files that differ; write nothing")
    parser.add_argument("--stack", nargs="+", metavar="METHOD",
                        help="generate one bundle of several methods stacked in this order (into --out)")
    parser.add_argument("--out", type=Path, help="the folder of the --stack bundle")
    args = parser.parse_args(argv)
    if args.stack:
        if args.out is None:
            parser.error("--stack needs --out DIR")
        generate_stack(args.stack, args.out)
        print(f"wrote the {' + '.join(args.stack)} bundle to {args.out}")
        return 0
    if args.check:
        problems = drift()
        for problem in problems:
            print(f"{problem} (run python {TOOL})")
        return 1 if problems else 0
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
