"""Offline evaluation: dataset readers (MVTec AD, VisA, folders), synthetic data, the evaluation loop,
exact detection metrics and the report it writes."""
