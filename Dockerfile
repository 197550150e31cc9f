FROM python:3.11-slim
WORKDIR /opt/guard
COPY pyproject.toml README.md ./
COPY guard ./guard
COPY migrations ./migrations
RUN pip install --no-cache-dir -e '.[fast]' && useradd --system guard
USER guard
EXPOSE 4573 8080
CMD ["guard", "serve"]
