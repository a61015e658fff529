"""Batch scoring on Spark (issue 20, part 2): ``mlflow.pyfunc.spark_udf`` of a registered
model whose dataset and artifacts are on S3 (moto_server on loopback), a real Spark
``local[2]`` with several partitions. The model directory Spark ships to its executors holds
a few KB (no weights): each executor's Python worker reads the weights from the object store
itself, and the predictions equal the in-process pyfunc's."""

from __future__ import annotations

import os
import shutil
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

import mlflow_lance as ml

pyspark = pytest.importorskip("pyspark", reason="pyspark is installed by scripts/test.sh")
if shutil.which("java") is None:  # scripts/test.sh installs Debian's openjdk-17-jre-headless
    pytest.skip("no Java runtime for Spark", allow_module_level=True)


def _net() -> torch.nn.Module:
    torch.manual_seed(11)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.Linear(512, 1)
    )


@pytest.mark.slow  # 20 s in the last full run
def test_spark_udf_scores_partitions_with_weights_read_from_s3_on_each_executor(s3_server, tmp_path, monkeypatch):
    from pyspark.sql import SparkSession

    for key, value in s3_server["env"].items():
        monkeypatch.setenv(key, value)  # the driver's, and so the executors' environment
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)  # executors run this environment's Python
    monkeypatch.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("MLFLOW_LANCE_ROOT", raising=False)  # the Lance root follows the artifact root: S3
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    bucket = f"s3://{s3_server['bucket']}/spark-{tmp_path.name}"
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("spark", artifact_location=bucket))
    model = _net()
    rows = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    frame = pd.DataFrame(rows, columns=list("abcd"))
    try:
        with mlflow.start_run():
            info = ml.log_model(model, name="model", registered_model_name="spark-scored", input_example=frame[:2])
        mlflow.MlflowClient().set_registered_model_alias("spark-scored", "champion", "1")
        dataset = info.flavors["mlflow_lance"]["lance_uri"]
        assert dataset.startswith("s3://")  # the weights are on the object store, not in the artifacts
        shipped = mlflow.artifacts.download_artifacts("models:/spark-scored@champion", dst_path=str(tmp_path / "dl"))
        shipped_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(shipped) for f in fs)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        assert shipped_bytes < weights / 10, (shipped_bytes, weights)  # what Spark ships: no weights
        expected = mlflow.pyfunc.load_model("models:/spark-scored@champion").predict(frame)

        spark = (
            SparkSession.builder.master("local[2]")
            .appName("mlflow-lance-spark-udf")
            .config("spark.ui.enabled", "false")
            .config("spark.sql.shuffle.partitions", "4")
            .config("spark.driver.host", "127.0.0.1")
            .getOrCreate()
        )
        try:
            df = spark.createDataFrame(frame).repartition(4)
            assert df.rdd.getNumPartitions() == 4
            udf = mlflow.pyfunc.spark_udf(spark, "models:/spark-scored@champion", env_manager="local")
            scored = df.withColumn("prediction", udf(*frame.columns)).toPandas()
        finally:
            spark.stop()
    finally:
        mlflow.set_tracking_uri(None)
    scored = scored.sort_values(list("abcd")).reset_index(drop=True)
    want = frame.assign(prediction=np.asarray(expected).reshape(-1)).sort_values(list("abcd")).reset_index(drop=True)
    np.testing.assert_allclose(scored["prediction"].to_numpy(), want["prediction"].to_numpy(), rtol=1e-6)
    assert len(scored) == len(frame)
