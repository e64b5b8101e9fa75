from django import forms
from django.conf import settings

from training.hyperparameters import RANGES
from training.models import Dataset


class UploadForm(forms.Form):
    name = forms.CharField(max_length=200)
    kind = forms.ChoiceField(choices=Dataset.Kind.choices, initial=Dataset.Kind.TICKETS)
    file = forms.FileField(help_text="Jira REST JSON export: .json, .json.gz or .zip")

    def clean_file(self):
        upload = self.cleaned_data["file"]
        limit = settings.MAX_UPLOAD_MB * 1024 * 1024
        if upload.size > limit:
            raise forms.ValidationError(
                f"The file is {upload.size / 1048576:.0f} MB; the limit is {settings.MAX_UPLOAD_MB} MB "
                "(EMBEDPORTAL_MAX_UPLOAD_MB)."
            )
        return upload


class RunForm(forms.Form):
    base_model = forms.CharField(max_length=500, required=False, initial=settings.DEFAULT_BASE_MODEL)
    epochs = forms.IntegerField(required=False, initial=1)
    batch_size = forms.IntegerField(required=False, initial=32)
    learning_rate = forms.FloatField(required=False, initial=2e-5)
    warmup_ratio = forms.FloatField(required=False, initial=0.1)
    max_seq_length = forms.IntegerField(required=False, initial=256)
    max_steps = forms.IntegerField(required=False, help_text="Cap the number of steps (quick demo runs).")
    max_pairs = forms.IntegerField(required=False, help_text="Cap the number of training pairs.")
    seed = forms.IntegerField(required=False, initial=42)

    def hyperparameters(self) -> dict:
        return {name: self.cleaned_data.get(name) for name in RANGES if self.cleaned_data.get(name) is not None}
