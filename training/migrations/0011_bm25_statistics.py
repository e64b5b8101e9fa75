"""BM25 statistics per dataset for the keyword side of similar tickets (training.bm25), filled for existing datasets."""

from django.db import migrations, models
import django.db.models.deletion


def fill(apps, schema_editor):
    from training import bm25

    Dataset = apps.get_model("training", "Dataset")
    for dataset_id in Dataset.objects.values_list("pk", flat=True):
        bm25.refresh_statistics(dataset_id=dataset_id)


class Migration(migrations.Migration):
    dependencies = [("training", "0010_new_user_path")]

    operations = [
        migrations.AddField(model_name="document", name="bm25_length",
                            field=models.IntegerField(default=0, db_default=0, editable=False)),
        migrations.AddField(model_name="dataset", name="bm25_documents",
                            field=models.IntegerField(default=0, editable=False)),
        migrations.AddField(model_name="dataset", name="bm25_average_length",
                            field=models.FloatField(default=0.0, editable=False)),
        migrations.CreateModel(
            name="LexemeFrequency",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("lexeme", models.TextField()),
                ("documents", models.IntegerField()),
                ("dataset", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE,
                                              related_name="lexeme_frequencies", to="training.dataset")),
            ],
            options={"constraints": [models.UniqueConstraint(fields=("dataset", "lexeme"),
                                                             name="lexeme_frequency_unique")]},
        ),
        migrations.RunPython(fill, migrations.RunPython.noop),
    ]
