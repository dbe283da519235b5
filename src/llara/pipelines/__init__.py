"""Pipelines: the stages (training, retrieval, evaluation) composed into one job each.

- ``recipe.py``: ``llara recipe``, adapt on a corpus, mine and fine-tune, index; resumable;
- ``recipe_budget.py``: ``llara recipe --budget-minutes``, the fine-tuning steps the time budget affords;
- ``recipe_eval.py``: ``llara recipe --eval``, the built index scored on a BEIR directory's test queries;
- ``demo.py``: ``llara demo``, evaluate the embedded model, adapt it, evaluate again.

They sit above every stage they compose and below the entry points (``llara.serve``, ``llara.cli``);
they neither parse flags nor print (progress goes through a callback or a report object).
"""
