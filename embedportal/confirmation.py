"""Asking before a cancel, roll back or delete, without any script.

The button on a page is a link (GET) to its action's URL, which answers with
`confirm.html`: what will happen, and a form that POSTs `confirm=yes` back.
The action acts only on that POST; a GET or a POST without `confirm=yes` (an
old form, a double click on a stale page) gets the question again. Works with
JavaScript off and needs nothing beyond HTML.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


def confirmed(request: HttpRequest) -> bool:
    """True for the POST the confirmation page sends; anything else should show the question."""
    return request.method == "POST" and request.POST.get("confirm") == "yes"


def confirm_page(request: HttpRequest, *, title: str, question: str, consequence: str, action: str,
                 button: str, back: str, danger: bool = True) -> HttpResponse:
    """The question (200 for a GET; 400 for a POST that did not confirm, so nothing looks done)."""
    context = {"title": title, "question": question, "consequence": consequence, "action": action,
               "button": button, "back": back, "danger": danger}
    return render(request, "confirm.html", context, status=200 if request.method == "GET" else 400)
