"""The whole book with the tiny profile: every chapter executes, the strict build passes, every
chapter page exists with its figures, references no external URL, and renders in a browser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtp_lib import book

from render_check import external_urls, ink_fraction, render_dom, screenshot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built_book(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("book")
    mp = pytest.MonkeyPatch()
    mp.setenv("MTP_RESULTS_DIR", str(tmp / "results"))  # the kernels inherit it: nothing lands in data/
    try:
        book.run_chapters("tiny", stage=tmp / "stage", progress=False)
        # as after `run --chapter ...` on a fresh stage: build executes the chapter it lacks from the cache
        (tmp / "stage" / f"{book.list_chapters()[-1]}.ipynb").unlink()
        html = book.build_book(stage=tmp / "stage", output=tmp / "html")
    finally:
        mp.undo()
    return html


def test_every_chapter_page_exists_with_its_figures(built_book: Path) -> None:
    for chapter in book.list_chapters():
        page = built_book / f"{chapter}.html"
        assert page.is_file(), f"{chapter}.html was not built"
        text = page.read_text()
        images = re.findall(r'<img[^>]+src="([^"]+\.png)"', text)
        assert images, f"{chapter} shows no figure"
        for src in images:
            png = (page.parent / src).resolve()
            assert png.is_file() and ink_fraction(png) > 0.02, f"{chapter}: figure {src} missing or blank"
        assert "Traceback (most recent call last)" not in text, f"{chapter} shows a traceback"
        assert "injected-parameters" not in text, f"{chapter}: papermill's injected cell is visible"
        noise = re.findall(r"[A-Za-z]*Warning: .{0,80}|without encryption", text)
        assert not noise, f"{chapter} shows library warnings: {noise}"
    assert (built_book / "intro.html").is_file()


def test_pages_reference_no_external_url(built_book: Path) -> None:
    assert external_urls(built_book) == []


def test_chapter_page_renders_its_figure_and_widget(built_book: Path, tmp_path: Path) -> None:
    page = built_book / "chapters" / "00_models_and_data.html"
    dom = render_dom(page)
    assert "widget-dropdown" in dom and "jupyter-widgets" in dom, "the sample picker did not render"
    assert re.search(r'<img[^>]+src="[^"]*_images/[^"]+\.png"', dom)
    png = screenshot(page, tmp_path / "chapter0.png", window=(1280, 2400))
    assert ink_fraction(png) > 0.05
