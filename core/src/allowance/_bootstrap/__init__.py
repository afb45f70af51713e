"""The directory ``allowance run`` puts first on ``PYTHONPATH`` (``sitecustomize``)."""
