FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1
COPY requirements.txt .
# The CUDA build of torch comes with the requirements here: the GPU worker uses it.
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
EXPOSE 8000
