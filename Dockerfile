FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1
COPY requirements.txt .
# The CUDA build of torch comes with the requirements here: the GPU worker uses it.
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
# The app runs as "app", not root: the code stays root-owned (read-only to it);
# it writes only var/ (collected static files) and the /data volumes, which a
# fresh named volume takes over from the image with this ownership.
RUN useradd --create-home --uid 10001 app \
    && mkdir -p /app/var /data/models /data/uploads \
    && chown -R app:app /app/var /data
USER app
EXPOSE 8000
