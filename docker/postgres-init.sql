-- Run once by the postgres image on an empty data volume: MLflow's backend store beside Airflow's database.
CREATE DATABASE mlflow OWNER airflow;
