"""The manual and the lab notebook stay usable: every relative link and every repository path they name exists,
results/README.md names every file below results/ (and no file that is not there), README.md stays a short manual,
and no tracked text file speaks of how the work was organised instead of about the project."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_LIMIT = 16 * 1024  # bytes

# [text](target) and ![alt](target), one level of brackets allowed inside the text
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# a repository path named in prose or in a command: docs/..., results/..., experiments/...
REPO_PATH = re.compile(r"(?<![\w/.-])((?:docs|results|experiments)/[\w./@,-]*[\w/])")
# a path relative to results/, as results/README.md names its files
RESULTS_ENTRY = re.compile(r"`((?:current|history)/[^`\s<>]+\.\w+)`")
# CAPITALS stand for a value to fill in (STEPS, VARIANT, FILE); README is the one capitalised file name
PLACEHOLDER = re.compile(r"[A-Z]{2,}")

# Words about the work's organisation rather than the project. Each key word is spelt with one letter in brackets,
# so that a plain `git grep` for these words finds nothing in the tree, this file included.
PROCESS_WORDS = {
    "a tracker or pull-request number": r"\b(?:[i]ssue|PR|pull request)[ -]?#?\d+|(?<![\w&#])#\d+\b",
    "a numbered work period": r"\bs[e]ssion[ -]?\d+|\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|"
                              r"next|previous|later|this|that|each|one|a new|another) (?:s[e]ssion|s[i]tting)s?\b",
    "a word for the work's own organisation": r"\bs[e]ssions\b|\bl[e]ases?\b|\bthe l[e]ad\b(?! white| paint)"
                                               r"|\bl[e]ad's\b",
    "talk of a borrowed machine": r"\b(?:the|lent|borrowed) a[c]celerator\b|\ba[c]celerator (?:call|time|budget)\b"
                                 r"|\b(?:device|prepared) c[a]ll\b|\blent (?:H100|H200|GPU)\b",
    "a workplace tool's call syntax": r"\bfiles[_]at\b|\bcarry[=]\[|\brun\([c]ommand=|\bbudget_left[_]s\b",
    "a date used as a handle": r"(?<![\w-])20\d\d-[01]\d-[0-3]\d(?![\w-])",
}


def manual_files(root):
    return [root / "README.md", root / "DEVELOPERS.md", root / "results" / "README.md",
            *sorted((root / "docs").glob("*.md"))]


def broken_links(doc):
    """Relative link targets in `doc` (a Markdown file) that do not exist, anchors ignored."""
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # https:, mailto:, an anchor
            continue
        if not (doc.parent / target.split("#")[0]).exists():
            broken.append(target)
    return broken


def missing_paths(text, root):
    """docs/, results/ and experiments/ paths named in `text` that do not exist below `root` (placeholders skipped)."""
    paths = REPO_PATH.findall(text)
    return [p for p in paths if not PLACEHOLDER.search(p.replace("README", "")) and not (root / p).exists()]


def files_below(root, folder):
    """Files below root/folder that git tracks or would track (untracked but not ignored), as relative paths."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard", "-z",
                             "--", folder], capture_output=True, text=True, check=True).stdout.split("\0")
    return [name for name in listed if name and (root / name).is_file()]


def process_words(text):
    """(kind, words) for each PROCESS_WORDS match in `text`."""
    return [(kind, m.group(0)) for kind, pattern in PROCESS_WORDS.items()
            for m in re.finditer(pattern, text, re.IGNORECASE)]


def text_of(path):
    """A file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@pytest.fixture(scope="module")
def tracked():
    try:
        return files_below(ROOT, ".")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")


@pytest.mark.parametrize("doc", manual_files(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", manual_files(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_exists(doc):
    assert missing_paths(doc.read_text(), ROOT) == []


def test_results_index_names_every_file_below_results_and_only_files_that_are_there(tracked):
    index = (ROOT / "results" / "README.md").read_text()
    outputs = [name.removeprefix("results/") for name in files_below(ROOT, "results") if name != "results/README.md"]
    assert [name for name in outputs if f"`{name}`" not in index] == []
    assert [name for name in RESULTS_ENTRY.findall(index) if not (ROOT / "results" / name).is_file()] == []


def test_results_holds_outputs_only(tracked):
    assert [name for name in files_below(ROOT, "results") if name.endswith((".sh", ".py"))] == []


def test_readme_is_a_short_manual():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move studies to docs/ (limit {README_LIMIT})"


def test_the_tree_speaks_of_the_project_alone(tracked):
    found = []
    for name in tracked:
        text = text_of(ROOT / name)
        for kind, words in process_words(text) if text is not None else []:
            found.append(f"{name}: {kind}: {words!r}")
    assert found == []


def test_process_words_are_caught_and_ordinary_english_is_not():
    caught = ["see iss" "ue 14", "Iss" "ue-13's goal", "fixes #" "31", "in s" "ession 15", "the fifth s" "ession",
              "the l" "ead's checkout", "a l" "ease of 15 minutes", "the a" "ccelerator call",
              "run(c" "ommand=\"x\")", "carry" "=[\".gpu\"]", "files" "_at", "shipped on 20" "26-12-02"]
    assert [text for text in caught if not process_words(text)] == []
    ordinary = ["an issue with the cache", "requests.Session() keeps one HTTP session a thread", "release notes",
                "pt_inception-2015-12-05.pth", "# 1. the first step", "lead white and a figure sitting at a table",
                "the leading edge", "travelling_size(repo, carry=(), leave_out=())", "colour #ff0000"]
    assert [text for text in ordinary if process_words(text)] == []
