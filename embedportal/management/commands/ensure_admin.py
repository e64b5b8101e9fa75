"""Create the admin account on first start; print its credentials once."""

import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create an admin user (ADMIN_USERNAME / ADMIN_PASSWORD, or a generated password) if none exists."

    def handle(self, *args, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("Admin account exists.")
            return
        username = os.environ.get("ADMIN_USERNAME", "admin")
        password = os.environ.get("ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        shown = password if not os.environ.get("ADMIN_PASSWORD") else "(from ADMIN_PASSWORD)"
        self.stdout.write(self.style.SUCCESS(f"Admin account created: {username} / {shown}  (shown once)"))
