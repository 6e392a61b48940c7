"""``dataengine review``: push the pipeline's pseudo-labels to the review tools and pull the decisions back.

::

    dataengine review open                 # build/update the FiftyOne dataset, launch the App on 127.0.0.1
    dataengine review pull                 # FiftyOne tags and edits -> data/review/decisions.json
    dataengine review labelstudio push     # review queue + audit -> Label Studio (LABEL_STUDIO_URL / _API_KEY)
    dataengine review labelstudio pull     # Label Studio annotations -> data/review/decisions.json

Then ``dvc repro`` re-runs the ``filter`` stage (which re-calibrates on the decisions) and the ``review`` stage (which
applies them), and everything downstream, when the decisions changed.
Each action lives in its adapter module and is imported only when run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["review_cli", "add_common_args", "run_action"]

ACTIONS: dict[str, tuple[str, str]] = {
    "open": ("build or update the FiftyOne dataset and launch the App", "dataengine.review.fiftyone_app:open_cli"),
    "pull": ("write the FiftyOne reviewers' tags and edits to the decisions file",
             "dataengine.review.fiftyone_app:pull_cli"),
    "labelstudio push": ("send the review queue and the audit sample to a Label Studio project",
                         "dataengine.review.labelstudio:push_cli"),
    "labelstudio pull": ("merge the Label Studio annotations into the decisions file",
                         "dataengine.review.labelstudio:pull_cli"),
}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The pipeline paths every review action reads (defaults: the paths of ``dvc.yaml``)."""
    parser.add_argument("--params", default="params.yaml", help="params file with the review section "
                        "(default: %(default)s)")
    parser.add_argument("--filtered", default="data/filtered", help="filter stage output (default: %(default)s)")
    parser.add_argument("--pseudo", default="data/pseudo", help="pseudo_label stage output (default: %(default)s)")
    parser.add_argument("--data", default="data/prepared", help="prepare stage output (default: %(default)s)")
    parser.add_argument("--decisions", default="data/review/decisions.json",
                        help="the versioned decisions file (default: %(default)s)")


def run_action(body: Callable[[], int], *errors: type[Exception]) -> int:
    """Run a review action's body; an expected error becomes one ``error: ...`` line on stderr and exit code 1.

    Expected: a missing or unreadable pipeline output, a bad decisions or params file (their messages name the file
    and what to do), plus the action's own ``errors`` (a Label Studio connection, say). Anything else is a bug and
    keeps its traceback.
    """
    from dataengine.config import ParamsError  # noqa: PLC0415 (lazy: `dataengine --help` stays fast)
    from dataengine.review.decisions import DecisionsError  # noqa: PLC0415
    from dataengine.review.inputs import ReviewInputsError  # noqa: PLC0415

    try:
        return body()
    except (FileNotFoundError, ParamsError, DecisionsError, ReviewInputsError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _resolve(target: str) -> Callable[[list[str]], int]:
    module_name, func_name = target.split(":")
    module = __import__(module_name, fromlist=[func_name])
    return getattr(module, func_name)


def review_cli(argv: list[str]) -> int:
    """Dispatch ``dataengine review ACTION [options]``."""
    usage = "\n".join(f"  {name:<18} {help_text}" for name, (help_text, _) in ACTIONS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: dataengine review ACTION [options]\n\nactions:\n{usage}\n\n"
              "Run `dataengine review ACTION --help` for an action's options.")
        return 0 if argv else 2
    if argv[0] == "labelstudio" and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        actions = "\n".join(f"  {name.split()[1]:<6} {help_text}" for name, (help_text, _) in ACTIONS.items()
                             if name.startswith("labelstudio "))
        print(f"usage: dataengine review labelstudio ACTION [options]\n\nactions:\n{actions}\n\n"
              "The server comes from LABEL_STUDIO_URL and the token from LABEL_STUDIO_API_KEY. Run "
              "`dataengine review labelstudio ACTION --help` for an action's options.")
        return 0 if len(argv) > 1 else 2
    name = " ".join(argv[:2]) if argv[0] == "labelstudio" else argv[0]
    rest = argv[2:] if argv[0] == "labelstudio" else argv[1:]
    if name not in ACTIONS:
        print(f"dataengine review: unknown action {' '.join(argv[:2])!r}; choose from: {', '.join(ACTIONS)}",
              file=sys.stderr)
        return 2
    return int(_resolve(ACTIONS[name][1])(rest) or 0)
