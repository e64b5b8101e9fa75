# ImportJob joins the one job system (embedportal.jobs, issue #11).

from django.db import migrations, models


def forget_the_old_reaper(apps, schema_editor):
    """The beat entry "reap-stale-runs" (training.reap_stale_runs) left settings: embedportal.reap_jobs reaps
    imports now. django_celery_beat's DatabaseScheduler keeps the rows of removed entries, and this one would
    send a task no worker knows every minute."""
    try:
        periodic_task = apps.get_model("django_celery_beat", "PeriodicTask")
    except LookupError:  # beat's tables are not there (yet): no row to forget
        return
    periodic_task.objects.filter(task="training.reap_stale_runs").delete()


class Migration(migrations.Migration):

    dependencies = [
        ('training', '0007_runs_on_job_system'),
    ]

    operations = [
        # The job system's name (embedportal.jobs.Job.attempt); the counts are kept.
        migrations.RenameField(
            model_name='importjob',
            old_name='attempts',
            new_name='attempt',
        ),
        migrations.AddField(
            model_name='importjob',
            name='cancel_requested',
            field=models.BooleanField(default=False),
        ),
        migrations.AddField(
            model_name='importjob',
            name='enqueued_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='importjob',
            name='max_attempts',
            field=models.PositiveSmallIntegerField(default=3),
        ),
        migrations.AddField(
            model_name='importjob',
            name='progress',
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='importjob',
            name='task_id',
            field=models.CharField(blank=True, max_length=64),
        ),
        migrations.AlterField(
            model_name='importjob',
            name='phase',
            field=models.CharField(blank=True, max_length=64),
        ),
        migrations.AlterField(
            model_name='importjob',
            name='status',
            field=models.CharField(choices=[('staged', 'Previewed, not imported yet'), ('queued', 'Queued'), ('running', 'Running'), ('succeeded', 'Succeeded'), ('failed', 'Failed'), ('cancelled', 'Cancelled')], db_index=True, default='queued', max_length=16),
        ),
        migrations.RunPython(forget_the_old_reaper, migrations.RunPython.noop),
    ]
