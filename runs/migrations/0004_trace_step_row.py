"""Trace.step -> Trace.step_row (issue 11's name trap: ``trace.step_id`` was the Step row's
primary key while ``step.step_id`` is the workflow's id of the step). The column keeps its name,
``step_id``: no table is rewritten."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("runs", "0003_engine_package"),
    ]

    operations = [
        migrations.AlterField(
            model_name="trace",
            name="step",
            field=models.ForeignKey(
                blank=True,
                db_column="step_id",
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="traces",
                to="runs.step",
            ),
        ),
        migrations.RenameField(model_name="trace", old_name="step", new_name="step_row"),
    ]
