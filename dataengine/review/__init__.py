"""Human review: the FiftyOne App and Label Studio round trip, and the decisions file the ``review`` stage applies.

FiftyOne and the Label Studio SDK are imported only inside their adapters (:mod:`dataengine.review.fiftyone_app`,
:mod:`dataengine.review.labelstudio`), so the ``review`` stage and the decisions schema work without them.
"""
