from django.apps import AppConfig


class EmbedportalConfig(AppConfig):
    name = "embedportal"
