-- PostgreSQL creates the `prefect` database from POSTGRES_DB; MLflow gets its own.
CREATE DATABASE mlflow OWNER tunepath;
