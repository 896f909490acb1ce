"""The docs that ship with the project stay true to the tree: every repository path the README and
the pages of docs/ name exists, every `snakemake` command line in them parses with Snakemake's own
argument parser and names existing config files and profiles, every `python -m stages.<name>` and
`python <script>` names a module or script that exists, every link and #anchor lands on a file and
a heading, every reference to a section of a page lands on one, and nothing points at a file outside
the repository. Nothing here runs Snakemake."""

import contextlib
import functools
import glob
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what a newcomer reads: the README, the pages of docs/ and the config guide
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "config" / "README.md"]
PAGE_IDS = [str(p.relative_to(REPO)) for p in PAGES]
COMMAND_SEPARATORS = {"&&", "||", ";", "|"}
SECTION_REFERENCE = re.compile(r"(?<![\w/.-])((?:docs/[\w.-]+|config/README|README)\.md)#([\w-]+)")


def tracked_files():
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return names.splitlines()


def tracked_text_files():
    for name in tracked_files():
        path = REPO / name
        if path.suffix in {".py", ".md", ".yaml", ".smk", ""} and path.is_file():
            yield path


@functools.lru_cache(maxsize=None)
def tracked_entries(folder):
    """Names of what git tracks directly inside `folder` (relative to the repository; "" is its root):
    only paths that start with one of them are repository paths (results/, store/, assets/ are not)."""
    prefix = f"{folder}/" if folder else ""
    return frozenset(name[len(prefix):].split("/")[0] for name in tracked_files() if name.startswith(prefix))


def anchor(heading):
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def split_fences(text):
    """(prose with the fenced code blocks blanked out line for line, the lines inside fences)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            prose.append("")
        elif fenced:
            code.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), code


@functools.lru_cache(maxsize=None)
def anchors_of(path):
    return anchors_in(Path(path).read_text())


def anchors_in(text):
    """The anchors of markdown headings (code blocks left out), duplicates numbered as GitHub does."""
    prose, _ = split_fences(text)
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} (.+?)#*\s*$", prose, re.M):
        base = anchor(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def inline_code(prose):
    """The inline code spans of prose (a span may wrap onto the next line)."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def indented_commands(prose):
    """Indented code lines that are commands (an indented block outside fences)."""
    return [line.strip() for line in prose.splitlines()
            if re.match(r"^ {4,}(snakemake|python)\b", line)]


def tokens(line):
    """The words of a shell line, comments dropped; plain whitespace split where quoting is not shell's."""
    line = re.sub(r"(^|\s)#.*$", "", line)
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def commands(line):
    """The commands of a shell line (split at &&, ||, ; and |), a leading `$ ` prompt dropped."""
    words = tokens(line.removeprefix("$ "))
    out, current = [], []
    for word in words:
        if word in COMMAND_SEPARATORS:
            out.append(current)
            current = []
        else:
            current.append(word)
    out.append(current)
    return [c for c in out if c]


def code_texts(page, text=None):
    """Every piece of code of a page (`text`, else the file's): fenced lines (backslash continuations
    joined), inline spans, indented command lines."""
    prose, fenced = split_fences(page.read_text() if text is None else text)
    joined, pending = [], ""
    for line in fenced:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            joined.append(pending + line)
            pending = ""
    return joined + inline_code(prose) + indented_commands(prose)


def page_commands(page, text=None):
    return [c for code in code_texts(page, text) for c in commands(code)]


def resolve(path_text, base):
    """Paths under `base` that `path_text` names: `<placeholder>` and `{placeholder}` match any name,
    as does `*`; [] where nothing matches."""
    pattern = re.sub(r"<[^<>]*>|\{[^{}]*\}", "*", path_text)
    if any(ch in pattern for ch in "*?["):
        return [Path(p) for p in glob.glob(str(base / pattern))]
    return [base / pattern] if (base / pattern).exists() else []


def repo_path_problem(word, page):
    """None if `word` is no repository path or names one that exists, else what is wrong. A word is a
    repository path when its first component is something git tracks at the repository's root (or,
    for a page below the root, in the page's folder): `stages/midtrain.py`, `config/rows/<row>.yaml`,
    `Snakefile`; not `results/<row>/`, `sony/cmt` or `model.json`."""
    word = word.strip("()[]'\"").rstrip(",;:.")
    if not word or "://" in word or word.startswith(("-", "/", "~", "$")):
        return None
    path_text, _, section = word.partition("#")
    first = path_text.split("/")[0]
    folder = "" if page.parent == REPO else str(page.parent.relative_to(REPO))
    if first in tracked_entries(""):
        base = REPO
    elif folder and first in tracked_entries(folder):
        base = page.parent
    else:
        return None
    found = resolve(path_text, base)
    if path_text.endswith("/"):
        found = [p for p in found if p.is_dir()]
    if not found:
        return f"{word}: no such file or folder"
    if section and path_text.endswith(".md") and section not in anchors_of(found[0]):
        return f"{word}: no heading with anchor #{section} in {path_text}"
    return None


def path_problems(page, text=None):
    problems = set()
    for code in code_texts(page, text):
        for word in tokens(code) if " " in code else [code]:
            problem = repo_path_problem(word, page)
            if problem:
                problems.add(problem)
    return sorted(problems)


@functools.lru_cache(maxsize=None)
def snakemake_parser():
    from snakemake.cli import get_argument_parser

    return get_argument_parser()


def snakemake_problems(command):
    """What is wrong with one `snakemake ...` command line: it does not parse, or a
    --configfile or --profile it names does not exist."""
    line = shlex.join(command)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse prints its whole usage on a refusal
            args = snakemake_parser().parse_args(command[1:])
    except SystemExit:
        return [f"{line}: Snakemake's argument parser refuses it"]
    problems = []
    for configfile in args.configfile or []:
        if not resolve(str(configfile), REPO):
            problems.append(f"{line}: no config file {configfile}")
    for profile in args.profile or []:
        if not (resolve(profile, REPO) or resolve(profile, REPO / "profiles")):
            problems.append(f"{line}: no profile {profile} (neither {profile}/ nor profiles/{profile}/)")
    return problems


def python_problems(command):
    """What is wrong with one `python ...` command line: `-m stages.<name>` that is no module of stages/,
    or a script that does not exist."""
    line = shlex.join(command)
    rest = command[1:]
    if rest[:1] == ["-m"] and len(rest) > 1:
        module = rest[1]
        if not module.startswith("stages."):
            return []
        parts = module.split(".")
        found = resolve("/".join(parts) + ".py", REPO) + resolve("/".join(parts) + "/__init__.py", REPO)
        return [] if found else [f"{line}: no module {module}"]
    if rest and rest[0].endswith(".py") and not resolve(rest[0], REPO):
        return [f"{line}: no script {rest[0]}"]
    return []


def command_problems(page, text=None):
    problems = []
    for command in page_commands(page, text):
        if command[0] == "snakemake":
            problems += snakemake_problems(command)
        elif re.fullmatch(r"python[\d.]*", command[0]):
            problems += python_problems(command)
    return problems


def link_problems(page, text=None):
    """Markdown links of a page (`text`, else the file's) whose file does not exist or whose #anchor
    is no heading there."""
    text = page.read_text() if text is None else text
    prose, _ = split_fences(text)
    prose = re.sub(r"`[^`]*`", "", prose)
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path_text, _, section = target.partition("#")
        path = (page.parent / path_text).resolve()
        if path_text and not path.exists():
            problems.append(f"({target}): no file {path_text}")
        elif section and (path_text and path.suffix != ".md"
                          or section not in (anchors_of(path) if path_text else anchors_in(text))):
            problems.append(f"({target}): no heading with anchor #{section} in {(path if path_text else page).name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_repository_paths_in_the_docs_exist(page):
    assert path_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_commands_in_the_docs_parse_and_name_what_exists(page):
    assert command_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_links_and_anchors_in_the_docs_resolve(page):
    assert link_problems(page) == []


def test_the_docs_hold_commands_to_check():
    # the checks above would pass on pages that lost their commands
    found = [c[0] for page in PAGES for c in page_commands(page)]
    assert found.count("snakemake") >= 20 and found.count("python") >= 10


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    unlinked = [p.name for p in (REPO / "docs").glob("*.md") if f"(docs/{p.name}" not in readme]
    assert not unlinked


def test_the_readme_holds_the_test_commands_ci_runs():
    # .ci/run runs "the README's test command", then the heavy and SLURM selection
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip().startswith("python -m pytest")]
    assert ci == ["python -m pytest -q", 'python -m pytest -q -m "heavy or slurm" -n 2']
    _, fenced = split_fences((REPO / "README.md").read_text())
    assert "python -m pytest -q" in [line.strip() for line in fenced]
    assert all(line in (REPO / "README.md").read_text() for line in ci)


def test_section_references_anywhere_land_on_sections():
    cited = {}
    for path in tracked_text_files():
        for page, section in SECTION_REFERENCE.findall(path.read_text(errors="replace")):
            cited.setdefault((page, section), path)
    assert any(page == "docs/method.md" for page, _ in cited), "no file cites a section of docs/method.md"
    missing = {f"{page}#{section}": str(p.relative_to(REPO)) for (page, section), p in cited.items()
               if not (REPO / page).exists() or section not in anchors_of(REPO / page)}
    assert not missing, missing


def test_method_references_name_existing_sections():
    anchors = anchors_of(REPO / "docs" / "method.md")
    cited = {}
    for path in tracked_text_files():
        for a in re.findall(r"docs/method\.md#([\w-]+)", path.read_text(errors="replace")):
            cited.setdefault(a, path)
    assert cited, "no file cites a section of docs/method.md"
    missing = {a: str(p.relative_to(REPO)) for a, p in cited.items() if a not in anchors}
    assert not missing, missing


def test_no_reference_to_files_outside_the_repository():
    # the project's own method notes are docs/method.md; the spec it was written from is not shipped
    offenders = [str(p.relative_to(REPO)) for p in tracked_text_files()
                 if p.name != "test_docs.py" and "PAPER.md" in p.read_text(errors="replace")]
    assert not offenders


# ---- the checker itself, on a page written to fail each check


LOST_SECTION = "docs/method.md" + "#no-such-section"  # split, so the scan of every file does not see it
BAD_PAGE = """# A page

## Real section

Run `stages/midtrain.py`, `.ci/run`, `.ci/lost` and `stages/no_such_stage.py`, rows in `config/rows/<row>.yaml` and
`config/rows/<row>.toml`; `results/<row>/report.md` is made by a run and `sony/cmt` is elsewhere.
See [the rows](docs/rows.md), [a lost page](docs/lost.md), [here](#real-section), [nowhere](#no-section)
and `METHOD_SECTION`.

```bash
snakemake -c2 --configfile config/rows/cifar10-cmt-ect.yaml config/rows/smoke/pixel-ect.yaml
snakemake -c2 --configfile config/rows/no-such-row.yaml
snakemake --profile slurm --no-such-option
snakemake --profile no-such-profile
python -m stages.midtrain_mf --help && python -m stages.no_such_stage
python bench/row_costs.py --smoke && python bench/no_such_bench.py
```
""".replace("METHOD_SECTION", LOST_SECTION)


def test_the_checks_find_what_is_wrong_and_pass_what_is_right():
    page = REPO / "docs-check-page.md"  # never written: a page at the root, whose paths resolve as the README's
    paths = path_problems(page, BAD_PAGE)
    commands_found = command_problems(page, BAD_PAGE)
    links = link_problems(page, BAD_PAGE)
    # the prose's paths and the commands' files alike; results/<row>/ and sony/cmt are no repository paths
    assert paths == [".ci/lost: no such file or folder",
                     "bench/no_such_bench.py: no such file or folder",
                     "config/rows/<row>.toml: no such file or folder",
                     "config/rows/no-such-row.yaml: no such file or folder",
                     f"{LOST_SECTION}: no heading with anchor #no-such-section in docs/method.md",
                     "stages/no_such_stage.py: no such file or folder"]
    assert len(commands_found) == 5, commands_found
    assert any("no config file config/rows/no-such-row.yaml" in p for p in commands_found)
    assert any("--no-such-option" in p and "refuses" in p for p in commands_found)
    assert any("no profile no-such-profile" in p for p in commands_found)
    assert any("no module stages.no_such_stage" in p for p in commands_found)
    assert any("no script bench/no_such_bench.py" in p for p in commands_found)
    assert links == ["(docs/lost.md): no file docs/lost.md", "(#no-section): no heading with anchor #no-section in "
                     "docs-check-page.md"]


def test_anchors_follow_github():
    assert anchor("digits-cmt-ect (the default)") == "digits-cmt-ect-the-default"
    assert anchor("Post-training from a mid-trained flow map: ours against the authors' code") == \
        "post-training-from-a-mid-trained-flow-map-ours-against-the-authors-code"
    assert anchor("Time limits, slices and retries") == "time-limits-slices-and-retries"
