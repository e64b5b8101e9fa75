from django.conf import settings
from rest_framework import serializers

from training.models import Dataset, ModelVersion, TrainingRun


class DatasetSerializer(serializers.ModelSerializer):
    document_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Dataset
        fields = ["id", "name", "kind", "source_filename", "language", "document_count", "import_report", "created_at"]
        read_only_fields = fields


class DatasetUploadSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    kind = serializers.ChoiceField(choices=Dataset.Kind.choices, default=Dataset.Kind.TICKETS)
    file = serializers.FileField()

    def validate_file(self, upload):
        limit = settings.MAX_UPLOAD_MB * 1024 * 1024
        if upload.size > limit:
            raise serializers.ValidationError(
                f"The file is {upload.size / 1048576:.0f} MB; the limit is {settings.MAX_UPLOAD_MB} MB."
            )
        return upload


class TrainingRunSerializer(serializers.ModelSerializer):
    model_version = serializers.PrimaryKeyRelatedField(read_only=True)

    class Meta:
        model = TrainingRun
        fields = [
            "id", "dataset", "base_model", "hyperparameters", "status", "created_at", "started_at",
            "finished_at", "heartbeat_at", "error", "metrics", "model_version",
        ]
        read_only_fields = fields


class TrainingRunCreateSerializer(serializers.Serializer):
    dataset = serializers.IntegerField()
    base_model = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")
    hyperparameters = serializers.DictField(required=False, default=dict)


class ModelVersionSerializer(serializers.ModelSerializer):
    class Meta:
        model = ModelVersion
        fields = [
            "id", "name", "version", "base_model", "artifact_path", "dimensions", "source_run", "dataset",
            "stage", "metrics", "created_at",
        ]
        read_only_fields = fields
