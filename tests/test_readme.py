"""README.md stays a short guide: under 1,500 words, no paragraph over 100, every picture and link it names
exists (a link into a Markdown file's section names a heading of that file), and its Python examples run as
written."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"(!?)\[[^\]]*\]\(([^)\s]+)\)")


def prose_paragraphs(text: str) -> list[str]:
    """Blocks between blank lines, outside fenced code, that are not tables, headings or pictures."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [block for block in re.split(r"\n\s*\n", text)
            if block.strip() and not block.lstrip().startswith(("|", "#", "!["))]


def anchors(markdown: Path) -> set[str]:
    """GitHub's ids of a file's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_is_under_1500_words():
    words = len(README.read_text().split())  # as wc -w counts them
    assert words < 1500, f"README.md has {words} words"


def test_no_readme_paragraph_runs_past_100_words():
    long = [p[:60] for p in prose_paragraphs(README.read_text()) if len(p.split()) > 100]
    assert not long, long


def test_every_picture_and_link_of_the_readme_exists():
    links = LINK.findall(README.read_text())
    pictures = [target for bang, target in links if bang]
    assert "assets/tiny_teaser.png" in pictures and len(pictures) >= 8
    for bang, target in links:
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), target
        if anchor:
            assert anchor in anchors(ROOT / path), target


def test_the_paragraph_splitter_sees_prose_only():
    text = "# Title\n\none two three\n\n```bash\nmake demo\n\nmake test\n```\n\n| a | b |\n\n![x](y.png)\n"
    assert prose_paragraphs(text) == ["one two three"]


@pytest.mark.slow
def test_the_python_examples_run_as_written_and_save_what_they_show(tmp_path):
    """The README's Python blocks one after another, in a folder holding the checkout's files/ and inversion/,
    as a user runs them from a clone; diffusers' text-encoder notice is not shown. About a minute on 2 cores."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    assert len(blocks) == 4
    for folder in ("files", "inversion"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    (tmp_path / "examples.py").write_text("\n".join(blocks))
    done = subprocess.run([sys.executable, "examples.py"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "No LoRA keys associated" not in done.stderr
    saved = ["sample.safetensors", "sample.png", "edited.safetensors", "edited.png", "face.safetensors", "face.png",
             "edited_peft/README.md", "edited_kohya.safetensors", "edited_lora.png"]
    assert [name for name in saved if not (tmp_path / "outputs" / name).is_file()] == []
