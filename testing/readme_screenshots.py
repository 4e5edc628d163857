"""README pictures taken in the real frontend: a page made ready for a screenshot, and the PNGs the
README and the templates browser show, rewritten only when the picture changes.

Used by the browser tests, which take the README's screenshots as they check what is in them.
"""
from __future__ import annotations

from pathlib import Path

from browser_harness import VIEWPORT, Frontend


def ready_for_readme(frontend: Frontend) -> None:
    """The whole graph framed, no other workflow's tab, no job summary."""
    frontend.frame_graph()
    close_other_workflows(frontend)
    hide_job_summary(frontend)


def close_other_workflows(frontend: Frontend) -> None:
    """Close every workflow tab but the active one (through the frontend's workflow store, which
    asks nothing), so a screenshot's tab bar does not depend on what was opened before."""
    frontend.page.evaluate(
        """async () => {
             const store = app.extensionManager.workflow;
             for (const workflow of [...store.openWorkflows])
               if (workflow !== store.activeWorkflow) await store.closeWorkflow(workflow);
           }"""
    )
    frontend.page.wait_for_function("app.extensionManager.workflow.openWorkflows.length === 1")
    frontend.frames()


def hide_job_summary(frontend: Frontend) -> None:
    """Hide the job queue's "1 job completed" summary, which every page shows after any run on the
    server, so README screenshots show the workflow alone."""
    # Opacity, not visibility: the summary's children set their own visibility.
    frontend.page.evaluate(
        """() => {
             if (!document.getElementById('fewstep-hide-job-summary')) {
               const style = document.createElement('style');
               style.id = 'fewstep-hide-job-summary';
               style.textContent = '[data-fewstep-hidden] { opacity: 0 !important; }';
               document.head.append(style);
             }
             for (const button of document.querySelectorAll('button[aria-label="Expand job queue"]'))
               if (/\\bjobs? (completed|failed)\\b/.test(button.innerText))
                 button.parentElement.parentElement.setAttribute('data-fewstep-hidden', '');
           }"""
    )
    frontend.frames()


# Measured: retakes of the 13 workflow screenshots gave 0 visibly changed pixels (up to 8,779 raw
# ones); the first sentence of a workflow's note reworded gave 136, one digit drawn into a widget 39.
SAME_PICTURE_MAX_CHANGED_PIXELS = 16


def save_small_png(source: Path, target: Path, max_bytes: int = 250_000,
                   max_changed_pixels: int = SAME_PICTURE_MAX_CHANGED_PIXELS) -> Path:
    """Write `source` to `target` at the viewport's size as a palette PNG (UI screenshots have few
    colours), unless `target` already holds the same picture, so re-running the tests leaves the
    committed file be."""
    from PIL import Image

    image = Image.open(source).convert("RGB")
    size = (VIEWPORT["width"], VIEWPORT["height"])
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    quantised = image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    if target.is_file():
        with Image.open(target) as existing:
            if existing.size == quantised.size and visibly_changed_pixels(existing, quantised) <= max_changed_pixels:
                return target
    target.parent.mkdir(parents=True, exist_ok=True)
    quantised.save(target, optimize=True)
    if target.stat().st_size > max_bytes:
        raise AssertionError(f"{target} is {target.stat().st_size} bytes, over {max_bytes}")
    return target


def visibly_changed_pixels(before, after) -> int:
    """Pixels whose grey level moved by more than 32 of 255 once both pictures are blurred by 0.7 px.

    From run to run Chromium antialiases text and edges a little differently and the palette is
    chosen anew: thousands of pixels change by a few levels, on single-pixel edges (a visually
    identical retake differed in 8,779 raw pixels, none by more than 64 levels). The slight blur
    takes single-pixel speckle under the threshold; changed text, a widget value or a moved node is
    strong contrast over several pixels and stays above it. (A 1.5 px blur also hid a reworded
    sentence in a note's small print.)"""
    from PIL import ImageChops, ImageFilter

    blur = ImageFilter.GaussianBlur(0.7)
    difference = ImageChops.difference(before.convert("L").filter(blur), after.convert("L").filter(blur))
    return difference.point(lambda value: 255 if value > 32 else 0).histogram()[255]


def save_thumbnail(screenshot: Path, target: Path, width: int = 640) -> Path:
    """The templates browser's card picture (it asks for example_workflows/<name>.jpg): the README
    screenshot at `width`, rewritten only when that screenshot is newer, so a re-run changes nothing."""
    from PIL import Image

    if target.is_file() and target.stat().st_mtime >= screenshot.stat().st_mtime:
        return target
    with Image.open(screenshot) as image:
        image = image.convert("RGB")
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
        image.save(target, quality=82, optimize=True)
    return target
