from django import forms
from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, SkipFile

from training.hyperparameters import LOSS_LABELS
from embedportal import json_limits
from training.models import Dataset, JiraConnection, RetrainSchedule
from training.pairs import STRATEGIES


KIND_CHOICES = [("", "Detect from the file")] + list(Dataset.Kind.choices)
MAPPING_ROLES = ("key", "title", "body", "label", "group", "date", "negative", "score")


class UploadSizeLimitHandler(FileUploadHandler):
    """Stops reading a file upload as soon as it passes EMBEDPORTAL_MAX_UPLOAD_MB.

    Installed first, before Django's memory/temporary-file handlers (which
    stream anything above FILE_UPLOAD_MAX_MEMORY_SIZE to disk), so an oversize
    upload is neither kept in memory nor written to disk to the end.
    """

    def __init__(self, request=None, limit_bytes: int | None = None):
        super().__init__(request)
        self.limit_bytes = limit_bytes if limit_bytes is not None else settings.MAX_UPLOAD_MB * 1024 * 1024
        self.exceeded = False
        self.skipped_name = ""

    def new_file(self, field_name, file_name, *args, **kwargs):
        self.received = 0
        super().new_file(field_name, file_name, *args, **kwargs)

    def receive_data_chunk(self, raw_data, start):
        self.received = start + len(raw_data)
        if self.received > self.limit_bytes:
            self.exceeded = True
            self.skipped_name = self.file_name
            raise SkipFile()
        return raw_data

    def file_complete(self, file_size):
        return None

    @property
    def message(self) -> str:
        return (f"{self.skipped_name}: the file is larger than the {self.limit_bytes // 1048576} MB upload limit "
                "(EMBEDPORTAL_MAX_UPLOAD_MB).")


def limit_upload_size(request) -> UploadSizeLimitHandler | None:
    """Put the size limit in front of the upload handlers; None when the body was already read."""
    handler = UploadSizeLimitHandler(request)
    django_request = getattr(request, "_request", request)
    try:
        django_request.upload_handlers = [handler, *django_request.upload_handlers]
    except AttributeError:  # the body was parsed already (e.g. by a CSRF check): the form's size check still applies
        return None
    return handler


def _check_size(upload):
    limit = settings.MAX_UPLOAD_MB * 1024 * 1024
    if upload is not None and upload.size > limit:
        raise forms.ValidationError(
            f"The file is {upload.size / 1048576:.0f} MB; the limit is {settings.MAX_UPLOAD_MB} MB "
            "(EMBEDPORTAL_MAX_UPLOAD_MB)."
        )
    return upload


class MappingFields(forms.Form):
    """Which column plays which role, for files that are not a known export."""

    map_key = forms.CharField(required=False, label="Key column")
    map_title = forms.CharField(required=False, label="Title column (summary, question, anchor, text)")
    map_body = forms.CharField(required=False, label="Body column (description, answer, positive)")
    map_label = forms.CharField(required=False, label="Label column")
    map_group = forms.CharField(required=False, label="Group column")
    map_date = forms.CharField(required=False, label="Date column")
    map_negative = forms.CharField(required=False, label="Negative column")
    map_score = forms.CharField(required=False, label="Score column")
    map_attributes = forms.CharField(required=False, label="Attribute columns (comma-separated)")

    def mapping(self) -> dict | None:
        data = {role: self.cleaned_data.get(f"map_{role}", "").strip() for role in MAPPING_ROLES}
        data = {role: column for role, column in data.items() if column}
        attributes = [a.strip() for a in (self.cleaned_data.get("map_attributes") or "").split(",") if a.strip()]
        if attributes:
            data["attributes"] = attributes
        return data or None

    def mapping_fields(self):
        return [self[f"map_{role}"] for role in (*MAPPING_ROLES, "attributes")]


REPEATED_QUESTION_CHOICES = [
    ("keep", "Keep each answer as its own document (default)"),
    ("merge", "Merge the answers into one document per question"),
]
REPEATED_QUESTION_HELP = ("Q&A files only. A row identical to an earlier one (same question, same answer) is "
                          "always merged into it. Every merged row is listed in the report with its reason.")


def repeated_questions_field(*, initial: str = "keep") -> forms.ChoiceField:
    return forms.ChoiceField(choices=REPEATED_QUESTION_CHOICES, required=False, initial=initial,
                             widget=forms.RadioSelect, label="The same question answered in several rows",
                             help_text=REPEATED_QUESTION_HELP)


class UploadForm(MappingFields):
    name = forms.CharField(max_length=200)
    kind = forms.ChoiceField(choices=KIND_CHOICES, required=False, initial="")
    file = forms.FileField(
        help_text="Jira JSON (.json/.gz/.zip), Jira CSV, Q&A CSV/JSONL, StackFAQ JSON, pairs, triplets, "
        "text + label, or any CSV/JSONL/Parquet with a column mapping. Big files are imported in the "
        "background and you follow the import on its own page."
    )
    strict = forms.BooleanField(required=False, help_text="Refuse the whole file if any row is bad.")
    language = forms.CharField(max_length=32, required=False, initial="english",
                               help_text="Text-search configuration: english, german, french, simple, ...")
    repeated_questions = repeated_questions_field()

    field_order = ["name", "kind", "file", "strict", "language", "repeated_questions"]

    def clean_file(self):
        return _check_size(self.cleaned_data["file"])


class VersionUploadForm(MappingFields):
    file = forms.FileField(help_text="A newer export of the same dataset, or a duplicate links CSV")
    strict = forms.BooleanField(required=False, help_text="Refuse the whole file if any row is bad.")
    repeated_questions = repeated_questions_field(initial="")

    field_order = ["file", "strict", "repeated_questions"]

    def clean_file(self):
        return _check_size(self.cleaned_data["file"])


class JiraBaseUrlForm(forms.Form):
    """A dataset's Jira address set by hand (checked by datasets.set_jira_base_url)."""

    jira_base_url = forms.CharField(
        required=False, max_length=500, label="Jira address",
        widget=forms.TextInput(attrs={"placeholder": "https://your-site.atlassian.net", "inputmode": "url"}),
        help_text="Ticket keys link to {address}/browse/KEY. Empty removes it. A Jira connection's address "
                  "wins over this one.")


class PairsForm(forms.Form):
    strategy = forms.ChoiceField(choices=[("", "Default for the dataset")] + sorted(STRATEGIES.items()),
                                 required=False)
    link_types = forms.CharField(required=False, initial="duplicate",
                                 help_text="Link types used as positives, comma-separated (e.g. duplicate, reference)")
    weak_positives = forms.ChoiceField(choices=[("", "None"), ("component", "Same component"),
                                                ("issue_type", "Same issue type")], required=False)
    include_self_pairs = forms.BooleanField(required=False, initial=True)
    seed = forms.IntegerField(required=False, initial=42)
    sample = forms.IntegerField(required=False, initial=10, min_value=1, max_value=100)

    # What the page shows before the user changes anything.
    DEFAULTS = {"link_types": "duplicate", "include_self_pairs": "on", "seed": "42", "sample": "10"}

    def options(self) -> dict:
        data = self.cleaned_data
        link_types = tuple(t.strip().lower() for t in (data.get("link_types") or "duplicate").split(",") if t.strip())
        return {
            "strategy": data.get("strategy") or "",
            "link_types": link_types or ("duplicate",),
            "weak_positives": data.get("weak_positives") or "",
            "include_self_pairs": bool(data.get("include_self_pairs")),
            "seed": data.get("seed") if data.get("seed") is not None else 42,
            "sample": data.get("sample") or 10,
        }


class RunForm(forms.Form):
    """Every field is optional: empty means the default shown as the placeholder.

    Values are validated by training.hyperparameters.parse (the same rules as
    the API and the train command); this form only collects them as text.
    """

    base_model = forms.CharField(
        max_length=500, required=False, initial=settings.DEFAULT_BASE_MODEL,
        help_text="A Hugging Face id, or a folder under a directory your administrator allows.",
    )
    base_version = forms.IntegerField(
        required=False, min_value=1, label="Continue from version",
        help_text="Id of one of your model versions: train it further instead of the base model.",
    )
    loss = forms.ChoiceField(choices=[(k, v) for k, v in LOSS_LABELS.items()], required=False, initial="auto")
    strategy = forms.ChoiceField(
        choices=[("", "Dataset default")] + [(k, v.split(":")[0]) for k, v in STRATEGIES.items()], required=False
    )
    weak_positives = forms.ChoiceField(
        choices=[("", "None"), ("component", "Same component"), ("issue_type", "Same issue type")], required=False
    )
    hard_negatives = forms.BooleanField(required=False, help_text="Mine hard negatives with the base model.")
    epochs = forms.CharField(required=False, initial=1)
    batch_size = forms.CharField(required=False, initial=32)
    learning_rate = forms.CharField(required=False, initial=2e-5)
    warmup_ratio = forms.CharField(required=False, initial=0.1)
    weight_decay = forms.CharField(required=False, initial=0.01)
    max_seq_length = forms.CharField(required=False, initial=256)
    gradient_accumulation_steps = forms.CharField(required=False, initial=1)
    max_steps = forms.CharField(required=False, help_text="Cap the number of steps (quick demo runs).")
    max_pairs = forms.CharField(required=False, help_text="Cap the number of training examples.")
    early_stopping_patience = forms.CharField(required=False, help_text="Validations without gain before stopping.")
    checkpoint_steps = forms.CharField(required=False, help_text="Checkpoint and validate every N steps (default: each epoch).")
    matryoshka_dims = forms.CharField(required=False, help_text="e.g. 384,256,128,64")
    seed = forms.CharField(required=False, initial=42)
    evaluate = forms.BooleanField(required=False, initial=True, help_text="Held-out before/after evaluation.")

    def clean(self):
        """Fold base_version into base_model as `version:<id>` (the service checks it is yours)."""
        data = super().clean()
        version = data.get("base_version")
        if version is not None:
            if data.get("base_model") not in ("", None, settings.DEFAULT_BASE_MODEL):
                self.add_error("base_version", "Give a base model or a version to continue from, not both.")
            else:
                data["base_model"] = f"version:{version}"
        return data

    def hyperparameters(self) -> dict:
        values = {name: self.cleaned_data.get(name) for name in self.fields
                  if name not in ("base_model", "base_version")}
        values["hard_negatives"] = bool(values.get("hard_negatives"))
        values["evaluate"] = bool(values.get("evaluate"))
        return {k: v for k, v in values.items() if v not in (None, "")}


# --- Jira link and daily retraining (training/retraining.py) ----------------------------------------


class JiraConnectionForm(forms.Form):
    """The dataset's Jira link. The token field is never filled in again: an empty one keeps the stored token."""

    base_url = forms.CharField(label="Jira address", max_length=500,
                               widget=forms.TextInput(attrs={"placeholder": "https://your-site.atlassian.net"}))
    flavor = forms.ChoiceField(label="Jira type", choices=JiraConnection.Flavor.choices)
    jql = forms.CharField(label="JQL", max_length=4000, widget=forms.TextInput(attrs={"placeholder": "project = HDFS"}))
    email = forms.CharField(label="E-mail (Cloud)", max_length=254, required=False)
    token = forms.CharField(label="API token (Cloud) or personal access token (Data Center)", max_length=2000,
                            required=False, strip=True, widget=forms.PasswordInput(render_value=False),
                            help_text="Stored encrypted and never shown again; leave empty to keep the stored one.")


class JiraDatasetForm(JiraConnectionForm):
    """A new tickets dataset that starts empty and is filled from Jira."""

    name = forms.CharField(label="Dataset name", max_length=200)
    field_order = ["name", "base_url", "flavor", "jql", "email", "token"]


class RetrainScheduleForm(forms.Form):
    """When to retrain (crontab fields in a time zone), from which model, and the guard."""

    enabled = forms.BooleanField(label="Retrain on this schedule", required=False)
    hour = forms.CharField(label="Hour", max_length=64, initial="2", help_text="crontab: 2, or 2,14")
    minute = forms.CharField(label="Minute", max_length=64, initial="0")
    day_of_week = forms.CharField(label="Days", max_length=64, initial="*", help_text="* (daily), mon-fri, sun")
    time_zone = forms.CharField(label="Time zone", max_length=64, help_text="IANA name, e.g. Europe/Berlin")
    start_from = forms.ChoiceField(label="Start from", choices=RetrainSchedule.StartFrom.choices)
    base_model = forms.CharField(label="Base model (when starting from it)", max_length=500, required=False,
                                 help_text="Empty: the server's default base model")
    hyperparameters = forms.CharField(label="Hyperparameters (JSON)", required=False,
                                      widget=forms.TextInput(attrs={"placeholder": '{"max_steps": 500}'}))
    margin = forms.FloatField(label="Margin", help_text="promote when the 95% lower bound of the nDCG@10 gain is above it")
    tolerance = forms.FloatField(label="Tolerance", min_value=0, help_text="no metric of the table may drop more")
    webhook_url = forms.CharField(label="Webhook URL", max_length=2000, required=False,
                                  widget=forms.PasswordInput(render_value=False),
                                  help_text="JSON POST (Slack-compatible) on promotion and failure; stored encrypted, "
                                            "only its host is shown. Empty keeps the stored one.")
    remove_webhook = forms.BooleanField(label="Remove the webhook", required=False)

    def clean_hyperparameters(self) -> dict:
        raw = (self.cleaned_data.get("hyperparameters") or "").strip()
        if not raw:
            return {}
        try:
            value = json_limits.loads(raw, what="hyperparameters")
        except json_limits.JSONLimitError as exc:
            raise forms.ValidationError(str(exc)) from None
        if not isinstance(value, dict):
            raise forms.ValidationError('Give an object, e.g. {"max_steps": 500}.')
        return value

    def webhook(self) -> str | None:
        """What save_schedule takes: "" removes the webhook, None keeps it."""
        if self.cleaned_data.get("remove_webhook"):
            return ""
        return self.cleaned_data.get("webhook_url") or None
