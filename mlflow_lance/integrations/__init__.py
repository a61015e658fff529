"""Optional integrations with training frameworks; each lives behind its extra and is imported
only when its module is: ``mlflow_lance.integrations.lightning`` (``pip install
'mlflow-lance[lightning]'``) and ``mlflow_lance.integrations.transformers``
(``pip install 'mlflow-lance[transformers]'``). Importing this package imports neither."""
