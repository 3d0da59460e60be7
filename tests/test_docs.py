"""The Markdown docs: the README stays one page, and every relative link resolves (file and #anchor)."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose_lines(text):
  """The lines outside fenced code blocks, with inline code spans blanked."""
  inside = False
  for line in text.splitlines():
    if _FENCE.match(line.lstrip()):
      inside = not inside
      continue
    if not inside:
      yield re.sub(r"`[^`]*`", "``", line)


def _anchors(path):
  """GitHub's heading anchors: lowercase, punctuation removed, spaces to '-', repeats numbered."""
  seen = {}
  anchors = set()
  inside = False
  for line in path.read_text(encoding="utf-8").splitlines():
    if _FENCE.match(line.lstrip()):
      inside = not inside
      continue
    match = None if inside else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not match:
      continue
    slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    anchors.add(slug if count == 0 else f"{slug}-{count}")
  return anchors


def test_readme_is_one_page():
  lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
  assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
  broken = []
  for line in _prose_lines(doc.read_text(encoding="utf-8")):
    for target in _LINK.findall(line):
      if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        continue
      file_part, _, anchor = target.partition("#")
      path = (doc.parent / file_part).resolve() if file_part else doc
      if not path.exists():
        broken.append(f"{target}: no file {path}")
      elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
        broken.append(f"{target}: no heading #{anchor} in {path.name}")
  assert not broken, "\n".join(broken)
