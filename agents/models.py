"""Rows behind step flow control and agent calls: credentials, rate limits, concurrency limits.

- :class:`Credential`: a tenant's secret for outgoing calls, named by an alias that ``http`` steps
  give as ``credential: <alias>``; the secret is encrypted at rest (``agents.credentials``).
- :class:`RateLimit`: a token bucket (seed 004's ``rate_limits`` table: key, tokens, last refill,
  refill rate, capacity), shared by every worker process through the database
  (``runs.engine.gate.ratelimit``); :class:`TokenReservation` is a waiting step's place in a bucket's line.
- :class:`ConcurrencyLimit`, :class:`ConcurrencySlot`, :class:`SlotWaiter`, :class:`QueuedRun`:
  concurrent steps per key and concurrent runs per template or tenant (``runs.engine.gate.concurrency``).
  A slot lives exactly as long as the lease of the step holding it.

Other apps call the service modules, not these rows.
"""

from __future__ import annotations

from django.db import models
from django.db.models import F, Q


class CredentialKind(models.TextChoices):
    BEARER = "bearer"  # Authorization: Bearer <secret>
    BASIC = "basic"  # Authorization: Basic base64(username:secret)
    HEADER = "header"  # <name>: <secret>
    API_KEY = "api_key"  # <name>: <secret> (header, default X-API-Key) or ?<name>=<secret> (query)


class ApiKeyLocation(models.TextChoices):
    HEADER = "header"
    QUERY = "query"


class ManagedBy(models.TextChoices):
    """Who sets a limit's numbers: the workflow that declares it, or an operator in the admin."""

    WORKFLOW = "workflow"  # created on first use from the workflow's declaration, follows it
    ADMIN = "admin"  # edited in the admin: the workflow's numbers no longer override it


class Credential(models.Model):
    """A secret an ``http`` step sends, resolved by ``(tenant, alias)`` when the step runs.

    ``secret_encrypted`` is a Fernet token (``agents.credentials.encrypt``); the plain secret is
    never stored, never returned by the API, never shown in the admin, and is masked wherever it
    would appear in traces, logs, errors and step outputs.
    """

    tenant_id = models.CharField(max_length=100, default="default", help_text="Slug of the owning tenant.")
    alias = models.SlugField(max_length=100, help_text="The name steps use: `credential: <alias>`.")
    kind = models.CharField(max_length=16, choices=CredentialKind.choices, default=CredentialKind.BEARER)
    username = models.CharField(max_length=200, blank=True, help_text="basic: the user name.")
    name = models.CharField(
        max_length=100,
        blank=True,
        help_text="header: the header's name; api_key: the header or query parameter (default X-API-Key).",
    )
    location = models.CharField(
        max_length=8, choices=ApiKeyLocation.choices, default=ApiKeyLocation.HEADER, help_text="api_key only."
    )
    secret_encrypted = models.TextField(editable=False)
    allowed_hosts = models.JSONField(
        default=list, blank=True, help_text="Host names the secret may be sent to (empty: any host)."
    )
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant_id", "alias"]
        constraints = [
            # resolution at run time: one credential per alias in a tenant
            models.UniqueConstraint(fields=["tenant_id", "alias"], name="credential_tenant_alias_uniq"),
            models.CheckConstraint(
                condition=Q(kind__in=[c.value for c in CredentialKind]), name="credential_kind_valid"
            ),
            models.CheckConstraint(
                condition=~Q(kind=CredentialKind.HEADER) | ~Q(name=""), name="credential_header_has_name"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.alias} ({self.kind}, tenant {self.tenant_id})"

    def set_secret(self, secret: str) -> None:
        """Encrypt ``secret`` with the newest key (not saved: call ``save()``)."""
        from .keys import encrypt

        self.secret_encrypted = encrypt(secret)


class RateLimit(models.Model):
    """A token bucket shared by every worker: ``capacity`` tokens, refilled at ``refill_rate``/s.

    ``tokens`` is the balance at ``last_refill`` (0 to capacity); steps waiting for a token hold
    places in the bucket's line (``TokenReservation``) and come back when the refill reaches them.
    """

    key = models.CharField(max_length=255, unique=True, help_text="e.g. user:42:agent:clo, tenant:acme, host:api.x")
    capacity = models.PositiveIntegerField(default=1, help_text="Tokens the bucket holds: the largest burst.")
    refill_rate = models.FloatField(help_text="Tokens added per second.")
    tokens = models.FloatField(help_text="Tokens at the last refill (0 to capacity).")
    last_refill = models.DateTimeField()
    managed_by = models.CharField(max_length=16, choices=ManagedBy.choices, default=ManagedBy.WORKFLOW)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["key"]
        constraints = [
            models.CheckConstraint(condition=Q(capacity__gte=1), name="ratelimit_capacity_positive"),
            models.CheckConstraint(condition=Q(refill_rate__gt=0), name="ratelimit_refill_rate_positive"),
            models.CheckConstraint(
                condition=Q(tokens__lte=F("capacity")) & Q(tokens__gte=0), name="ratelimit_tokens_within_capacity"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.capacity} tokens, {self.refill_rate:g}/s)"


class TokenReservation(models.Model):
    """A waiting step's place in a bucket's line: it comes back at ``due_at`` and takes the next token."""

    step = models.ForeignKey("runs.Step", on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    due_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # the gate looks up a step's reservation of a bucket; one per step and bucket
            models.UniqueConstraint(fields=["step", "key"], name="tokenreservation_step_key_uniq"),
        ]
        indexes = [
            # the length of a bucket's line (reservations still due recently)
            models.Index(fields=["key", "due_at"], name="tokenreservation_line_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.key} token for step {self.step_id} at {self.due_at:%H:%M:%S.%f}"


class ConcurrencyLimit(models.Model):
    """How many holders a concurrency key allows at once.

    Keys: a step's ``concurrency.key`` (steps), ``template:<key>`` and ``tenant:<slug>`` (runs).
    ``limit`` 0 pauses the key: nothing new starts until it is raised.
    """

    key = models.CharField(max_length=255, unique=True)
    limit = models.PositiveIntegerField()
    managed_by = models.CharField(max_length=16, choices=ManagedBy.choices, default=ManagedBy.ADMIN)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["key"]

    def __str__(self) -> str:
        return f"{self.key} (limit {self.limit})"


class ConcurrencySlot(models.Model):
    """A step holding one slot of ``key``, for as long as its lease (``expires_at`` = lease expiry).

    Released when the attempt ends (completion, failure, cancellation); a slot whose lease
    expired (killed worker) no longer counts and is deleted by the next acquire or sweep.
    """

    key = models.CharField(max_length=255)
    step = models.OneToOneField("runs.Step", on_delete=models.CASCADE, related_name="+")
    lease_token = models.UUIDField()
    expires_at = models.DateTimeField()
    acquired_at = models.DateTimeField()

    class Meta:
        indexes = [
            # holders of a key that still count (acquire), expired ones (sweep)
            models.Index(fields=["key", "expires_at"], name="slot_key_expires_idx"),
            models.Index(fields=["expires_at"], name="slot_expires_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.key} held by step {self.step_id}"


class SlotWaiter(models.Model):
    """A step waiting for a slot of ``key``; a release wakes the most urgent (priority, then age)."""

    key = models.CharField(max_length=255)
    step = models.OneToOneField("runs.Step", on_delete=models.CASCADE, related_name="+")
    priority = models.PositiveSmallIntegerField(default=5)
    since = models.DateTimeField()

    class Meta:
        indexes = [
            # the next waiter to wake on a release
            models.Index(fields=["key", "priority", "since"], name="slotwaiter_next_idx"),
        ]

    def __str__(self) -> str:
        return f"step {self.step_id} waiting for {self.key}"


class QueuedRun(models.Model):
    """A run created ``pending`` because its template or tenant was at its concurrent-run limit.

    Admitted (``runs.engine.activate_run``) by priority then age when a run of the same
    template or tenant finishes, or by the sweeper.
    """

    run = models.OneToOneField("runs.Run", on_delete=models.CASCADE, primary_key=True, related_name="+")
    tenant_id = models.CharField(max_length=100)
    template_key = models.CharField(max_length=200)
    priority = models.PositiveSmallIntegerField(default=5)
    reason = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["priority", "created_at"]
        indexes = [
            # admission order
            models.Index(fields=["priority", "created_at"], name="queuedrun_order_idx"),
        ]

    def __str__(self) -> str:
        return f"run {self.run_id} of {self.template_key} waiting"


# --- the LLM router (agents.llm): providers, token budgets, circuit breakers -------------------------


class LLMProviderKind(models.TextChoices):
    """How a provider takes structured output: OpenAI's json_schema, or llama.cpp's json_object + schema."""

    OPENAI = "openai"
    LLAMACPP = "llamacpp"


class LLMProvider(models.Model):
    """A tenant's own OpenAI-compatible endpoint, tried with the deployment's in priority order.

    The API key is never stored here: ``credential_alias`` names a :class:`Credential` of the same
    tenant (usually ``bearer``), resolved and decrypted only when a call is made.
    """

    tenant_id = models.CharField(max_length=100, default="default", help_text="Slug of the owning tenant.")
    name = models.SlugField(max_length=100, help_text="Shown in traces, metrics and usage records.")
    base_url = models.URLField(max_length=500, help_text="The API root, e.g. https://api.openai.com/v1.")
    model = models.CharField(max_length=200, help_text="The model asked for (a step's `model` overrides it).")
    credential_alias = models.SlugField(
        max_length=100, blank=True, help_text="A credential of this tenant holding the API key (empty: no key)."
    )
    kind = models.CharField(max_length=16, choices=LLMProviderKind.choices, default=LLMProviderKind.OPENAI)
    priority = models.PositiveSmallIntegerField(
        default=10, help_text="Lower is tried first; a loopback URL is always 0 (and tagged planning)."
    )
    tags = models.JSONField(
        default=list, blank=True, help_text='e.g. ["planning"]: calls asking for a tag try these first.'
    )
    enabled = models.BooleanField(default=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant_id", "priority", "name"]
        verbose_name = "LLM provider"
        constraints = [
            # one provider per name in a tenant (metrics, breaker keys and usage name it)
            models.UniqueConstraint(fields=["tenant_id", "name"], name="llmprovider_tenant_name_uniq"),
            models.CheckConstraint(
                condition=Q(kind__in=[c.value for c in LLMProviderKind]), name="llmprovider_kind_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.model} at {self.base_url}, tenant {self.tenant_id})"


class BudgetPeriod(models.TextChoices):
    DAY = "day"  # resets at midnight (settings' time zone)
    MONTH = "month"  # resets on the first of the month


class BudgetPolicy(models.TextChoices):
    WAIT = "wait"  # the step waits for the window to reset (no attempt spent)
    FAIL = "fail"  # the step fails at once with budget_exceeded


class TokenBudget(models.Model):
    """A tenant's LLM token allowance per day or per month (prompt + completion tokens).

    ``used``: tokens charged in the window that began at ``window_start``; ``reserved``: tokens
    held by calls in flight (:class:`TokenBudgetHold`). A call is admitted only by the conditional
    UPDATE ``used + reserved + n <= limit`` (``agents.llm.budgets``), so concurrent calls cannot
    overrun it.
    """

    tenant_id = models.CharField(max_length=100, default="default", help_text="Slug of the owning tenant.")
    period = models.CharField(max_length=8, choices=BudgetPeriod.choices, default=BudgetPeriod.DAY)
    limit = models.PositiveBigIntegerField(help_text="Tokens per period (prompt + completion).")
    policy = models.CharField(max_length=8, choices=BudgetPolicy.choices, default=BudgetPolicy.FAIL)
    used = models.BigIntegerField(default=0, help_text="Tokens charged in the current window.")
    reserved = models.BigIntegerField(default=0, help_text="Tokens held by calls in flight.")
    window_start = models.DateTimeField(null=True, blank=True, help_text="Start of the current window.")
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant_id", "period"]
        constraints = [
            # reservation looks up a tenant's budgets; one per period
            models.UniqueConstraint(fields=["tenant_id", "period"], name="tokenbudget_tenant_period_uniq"),
            models.CheckConstraint(condition=Q(used__gte=0) & Q(reserved__gte=0), name="tokenbudget_counts_positive"),
            models.CheckConstraint(
                condition=Q(period__in=[c.value for c in BudgetPeriod]), name="tokenbudget_period_valid"
            ),
            models.CheckConstraint(
                condition=Q(policy__in=[c.value for c in BudgetPolicy]), name="tokenbudget_policy_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.period}: {self.used}/{self.limit} tokens ({self.policy})"


class TokenBudgetHold(models.Model):
    """Tokens a call in flight holds on a budget, released when it settles.

    A worker killed mid-call leaves its hold behind: holds past ``expires_at`` are released by the
    next reservation on the same budget, so ``reserved`` never leaks for longer than that.
    """

    budget = models.ForeignKey(TokenBudget, on_delete=models.CASCADE, related_name="holds")
    tokens = models.PositiveBigIntegerField()
    expires_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            # expired holds of a budget (released at the next reservation)
            models.Index(fields=["budget", "expires_at"], name="tokenbudgethold_expiry_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.tokens} tokens on budget {self.budget_id}"


class LLMCircuit(models.Model):
    """Circuit-breaker state of one LLM provider, shared by every worker through this row.

    Closed while ``open_until`` is empty or past. ``failures`` consecutive failures (connection
    error, timeout, 5xx) open it for the cool-down; a 429 opens it until its Retry-After. After
    that one caller takes the half-open probe (a conditional UPDATE pushes ``open_until`` forward);
    a success closes it. Shape after Nygard, "Release It!", Circuit Breaker.
    """

    key = models.CharField(max_length=255, unique=True, help_text="deployment:<name> or tenant:<slug>:<name>.")
    failures = models.PositiveIntegerField(default=0)
    open_until = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["key"]
        verbose_name = "LLM circuit breaker"

    def __str__(self) -> str:
        return f"{self.key} ({self.failures} failures)"
