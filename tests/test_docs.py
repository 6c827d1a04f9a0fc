"""The project's documentation stands on its own: every section citation (`docs/format.md` plus a section sign
and number) and every `.md` file named in the code, tests, scripts and docs is a file of this project with that
numbered section; no text points at notes outside the project or at paths of the machine it was written on;
every relative link of the Markdown files resolves to a file and, where it names one, a heading; and the README
tells a ComfyUI user where the merged file goes and which stock node loads it."""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECTION = "\u00a7"  # the section sign, spelled out so that this file does not cite anything itself
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".in", ".lock", ".cfg", ".ini", ".json", ".yaml", ".yml"}
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "demo"}
CITING = ("converter", "mappings", "tests", "scripts", "docs", "README.md", "ARCHITECTURE.md")

# a Markdown file named in prose (a path relative to the root or to the naming file); `owner/repo:` marks a public one
MD_REF = re.compile(r"(?<![\w./-])(?P<ext>[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+:)?(?P<path>[\w./-]*[\w-]\.md)\b")
SEC_REF = re.compile(SECTION + r"(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s+\S", re.M)
CITE_WINDOW = 200  # a section number belongs to the .md file named last before it, at most this far back


def project_files() -> list[pathlib.Path]:
    """The project's text files: tracked and new (not ignored) ones per git, else a walk of the tree."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        paths = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*") if not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted(p for p in paths if p.is_file() and p.suffix in TEXT_SUFFIXES)


def rel(p: pathlib.Path) -> str:
    return p.relative_to(ROOT).as_posix()


def citing_files() -> list[pathlib.Path]:
    return [p for p in project_files() if rel(p).split("/")[0] in CITING]


def resolve_md(name: str, where: pathlib.Path) -> pathlib.Path | None:
    """A Markdown file named in `where`: relative to the project root or to `where`'s folder, inside the project."""
    for base in (ROOT, where.parent):
        cand = (base / name).resolve()
        if cand.is_file() and ROOT in cand.parents and ".venv" not in cand.relative_to(ROOT).parts:
            return cand
    return None


def numbered_sections(md: pathlib.Path) -> set[str]:
    return set(HEADING.findall(strip_code_blocks(md.read_text(encoding="utf-8"))))


def strip_code_blocks(text: str) -> str:
    """Fenced code blocks blanked out (their lines kept, so offsets and line numbers stay)."""
    return re.sub(r"^```.*?^```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.M | re.S)


def section_citations(path: pathlib.Path) -> list[tuple[int, str, pathlib.Path | None, str]]:
    """(line, section, cited file or None, why) for every section sign followed by a number in `path`."""
    text = path.read_text(encoding="utf-8")
    refs = [(m.end(), m) for m in MD_REF.finditer(text)]
    out = []
    for s in SEC_REF.finditer(text):
        line = text.count("\n", 0, s.start()) + 1
        before = [m for end, m in refs if end <= s.start() and s.start() - end <= CITE_WINDOW]
        if not before:
            if path.parent == ROOT / "docs":  # a document citing its own sections
                out.append((line, s.group(1), path, ""))
            else:
                out.append((line, s.group(1), None, "names no document"))
            continue
        m = before[-1]
        if m.group("ext"):
            continue  # a section of a public source's document: not ours to check
        target = resolve_md(m.group("path"), path)
        out.append((line, s.group(1), target, "" if target else f"cites {m.group('path')}, not a project file"))
    return out


def test_the_format_doc_exists_with_numbered_sections():
    doc = ROOT / "docs/format.md"
    assert doc.is_file()
    secs = numbered_sections(doc)
    assert {str(i) for i in range(1, 13)} <= secs, sorted(secs)


def test_every_section_citation_resolves():
    bad, seen = [], 0
    for p in citing_files():
        for line, sec, target, why in section_citations(p):
            seen += 1
            if target is None:
                bad.append(f"{rel(p)}:{line}: {SECTION}{sec} {why}")
            elif sec not in numbered_sections(target):
                bad.append(f"{rel(p)}:{line}: {rel(target)} has no section {sec}")
    assert not bad, "\n".join(bad)
    assert seen >= 5  # the code does cite the format doc


def test_the_code_cites_the_format_doc():
    """The facts the merge maths rests on point at the project's own document."""
    want = {"tests/reference.py": ("5", "8"), "converter/planner.py": ("7",), "tests/test_merge_qwen.py": ("7",)}
    for name, secs in want.items():
        cites = {(rel(t), s) for _, s, t, _ in section_citations(ROOT / name) if t is not None}
        for s in secs:
            assert ("docs/format.md", s) in cites, (name, s, cites)


def test_every_markdown_file_named_is_a_project_file():
    bad = []
    for p in project_files():
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            for m in MD_REF.finditer(line):
                if m.group("ext") or "://" in line[max(0, m.start() - 200):m.start()]:
                    continue  # a public source (`owner/repo:path.md`) or a URL
                if resolve_md(m.group("path"), p) is None:
                    bad.append(f"{rel(p)}:{i}: {m.group('path')}")
    assert not bad, "Markdown files named that the project does not contain:\n" + "\n".join(bad)


# what must not appear: notes kept outside the project, and paths of a particular machine
OUTSIDE = [re.escape(x) for x in ("nunchaku-format" + ".md", "lora-formats" + ".md", "other-loaders" + ".md",
                                   "shared" + "/docs")] + [r"(?<![\w.])/" + "work/", r"(?<![\w.])/" + "home/"]
MACHINE_PATHS_IN_PROSE = [r"(?<![\w.:])/" + "tmp/", r"(?<![\w.:])/" + "root/", r"(?<![\w.:])/" + "mnt/"]


def test_nothing_points_outside_the_project():
    bad = []
    for p in project_files():
        pats = OUTSIDE + (MACHINE_PATHS_IN_PROSE if p.suffix == ".md" else [])
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            for pat in pats:
                if re.search(pat, line):
                    bad.append(f"{rel(p)}:{i}: {line.strip()[:120]}")
    assert not bad, "\n".join(bad)


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def anchors(md: pathlib.Path) -> set[str]:
    out, seen = set(), {}
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", strip_code_blocks(md.read_text(encoding="utf-8")), re.M):
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def markdown_docs() -> list[pathlib.Path]:
    return [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("md", markdown_docs(), ids=lambda p: rel(p))
def test_relative_links_resolve(md):
    text = re.sub(r"`[^`\n]*`", "", strip_code_blocks(md.read_text(encoding="utf-8")))
    bad = []
    for m in re.finditer(r"\[[^\]]*\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists() or ROOT not in (dest, *dest.parents):
            bad.append(f"{target}: no such file in the project")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor in {rel(dest)}")
    assert not bad, f"{rel(md)}:\n" + "\n".join(bad)


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README.md has no section '## {title}'"
    return m.group(1)


def test_readme_tells_how_to_use_the_file_in_comfyui():
    sec = readme_section("Use it in ComfyUI")
    assert "models/diffusion_models" in sec
    for node in ("Nunchaku Qwen-Image DiT Loader", "NunchakuQwenImageDiTLoader", "Nunchaku Z-Image DiT Loader",
                 "NunchakuZImageDiTLoader", "nodes/models/qwenimage.py", "nodes/models/zimage.py"):
        assert node in sec, node
    assert re.search(r"not load the merged LoRA again", sec) and "twice" in sec
    assert "quantization_config" in sec and "text-encoder" in sec.lower()
    assert "(docs/format.md)" in sec


def test_readme_links_the_format_doc_from_development():
    assert "(docs/format.md)" in readme_section("Development")
