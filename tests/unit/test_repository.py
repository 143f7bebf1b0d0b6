"""What a fresh clone must hold: the documents the code cites and the images the README shows."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = re.compile(r"\bdocs/[\w./-]+\.(?:md|json|ya?ml|png)")


def _sources() -> list[Path]:
    files = [*ROOT.joinpath("celery_adaptive").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py")]
    files += [ROOT / "README.md", *ROOT.joinpath("docs").rglob("*.md")]
    return [f for f in files if f.is_file()]


def test_every_cited_document_is_in_the_repository():
    cited: dict[str, list[str]] = {}
    for source in _sources():
        for match in DOC_PATH.findall(source.read_text(errors="replace")):
            cited.setdefault(match.rstrip("."), []).append(str(source.relative_to(ROOT)))
    assert "docs/celery-pool-contract.md" in cited, "the code cites the contract by its docs/ path"
    missing = {path: where for path, where in cited.items() if not (ROOT / path).is_file()}
    assert not missing, f"cited but not in the repository: {missing}"


def test_code_cites_no_document_outside_the_repository():
    outside = re.compile(r"\.\./shared|/work/shared|the contract, section|contract section \d")
    offenders = [
        str(source.relative_to(ROOT)) for source in _sources()
        if source.suffix == ".py" and source != Path(__file__).resolve()
        and outside.search(source.read_text(errors="replace"))
    ]
    assert not offenders, f"cite docs/ instead: {offenders}"


IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")


def test_readme_images_are_files_of_the_repository():
    """The README renders without a broken image: each one is a file here that git keeps
    (bench/results/ is ignored, so its plots are copied into docs/img/ by
    scripts/readme-images.sh)."""
    import subprocess

    readme = (ROOT / "README.md").read_text()
    images = [a or b for a, b in IMAGE.findall(readme)]
    assert images, "the README shows images"
    for image in images:
        assert "://" not in image and not image.startswith("/"), f"{image}: not a file of the repository"
        assert image.startswith("docs/img/"), f"{image}: README images live in docs/img/"
        assert (ROOT / image).is_file(), f"{image} is missing"
        ignored = subprocess.run(["git", "check-ignore", "-q", image], cwd=ROOT, capture_output=True)
        assert ignored.returncode != 0, f"{image} is ignored by git: a fresh clone would not have it"
