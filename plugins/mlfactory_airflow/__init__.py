"""mlfactory's Airflow components: triggers, operators and Asset definitions on the official providers."""
