"""README.md stays a short guide: under 1,500 words, no paragraph over 100, and every picture and link it
names exists (a link into a Markdown file's section names a heading of that file)."""
import re
from pathlib import Path

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
