"""Getting a model onto the fleet safely: ``publish`` (signed, retained on the model topic), ``canary`` (a cohort
first, then promote or roll back) and ``canary_judge`` (the judge's statistics, pure numpy)."""
