"""The stack as deployed: config/cloudformation.yaml created on moto's
CloudFormation, and the worker run with the task definition the stack made.

Run by scripts/stack-test.sh (which installs moto into .local/venv-stack and
builds the local gateway). For each case below it:

  1. creates the stack on moto (the AWS resources are moto's);
  2. reads the task definition the stack made and starts the worker with
     exactly its environment, command, user, read-only root and health
     check (from the image when there is one, else the debug binary); only
     the AWS endpoints point at moto and the management endpoint at the
     local gateway (fanout-dev gateway);
  3. sends broadcasts through the queues and into the table the stack made
     or was given, to real WebSocket clients; gone connections' rows must be
     removed and a bad job dead-lettered;
  4. runs the health check as the task definition states it, then stops the
     worker with SIGTERM as ECS does, within the task's stop timeout;
  5. checks that every metric an alarm reads is in the worker's EMF output
     under the alarm's name, namespace and dimension.

moto's CloudFormation skips some resource types without an error (it marks
them created and makes nothing): AWS::SQS::QueuePolicy,
AWS::ApplicationAutoScaling::ScalableTarget and ::ScalingPolicy,
AWS::CloudWatch::Alarm. Those are checked statically here, from the template
with the stack's parameters applied.
"""

import argparse
import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import boto3
from cfn_template import template

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "config" / "cloudformation.yaml"
REGION = "us-east-1"
ACCOUNT = "123456789012"
API_ID = "abcde12345"
STAGE = "prod"
# An ECR image URI: the execution role's repository is derived from it.
IMAGE_URI = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/team/fanout:ci"
UNSUPPORTED_BY_MOTO = {
    "AWS::SQS::QueuePolicy",
    "AWS::ApplicationAutoScaling::ScalableTarget",
    "AWS::ApplicationAutoScaling::ScalingPolicy",
    "AWS::CloudWatch::Alarm",
    # The stack's own WebSocket API (CreateWebSocketApi): moto 5.2.5 has an
    # API Gateway v2 backend but no CloudFormation model for it. The rest of
    # that stack (its table, the integrations' role, the access-log group)
    # is made; these are checked from the template (websocket_checks).
    "AWS::ApiGatewayV2::Api",
    "AWS::ApiGatewayV2::Integration",
    "AWS::ApiGatewayV2::Route",
    "AWS::ApiGatewayV2::Deployment",
    "AWS::ApiGatewayV2::Stage",
    "AWS::ApiGatewayV2::Authorizer",
}

PROCS = []
CONTAINERS = []


def say(text):
    print(f"\n==> stack: {text}", flush=True)


def fail(text):
    raise SystemExit(f"stack: FAILED: {text}")


def check(ok, text):
    print(f"  [{'ok' if ok else 'FAILED'}] {text}", flush=True)
    if not ok:
        fail(text)


def free_port(start):
    for port in range(start, start + 200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    fail(f"no free port from {start}")


def wait_until(what, seconds, probe, interval=0.2):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    fail(f"timed out waiting for {what}")


def start(args, log, env=None):
    proc = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    PROCS.append(proc)
    return proc


def stop_all():
    for name in CONTAINERS:
        subprocess.run(["podman", "rm", "-f", "-t", "2", name], capture_output=True)
    for proc in PROCS:
        if proc.poll() is None:
            proc.terminate()
    for proc in PROCS:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- The template, read as CloudFormation reads it -------------------------




class Resolver:
    """Applies parameters and conditions to template values, for the parts
    of the template moto does not create."""

    def __init__(self, tpl, params):
        self.tpl = tpl
        self.params = {k: v.get("Default") for k, v in tpl["Parameters"].items()}
        self.params.update(params)
        for name, spec in tpl["Parameters"].items():
            if spec["Type"] == "CommaDelimitedList" and isinstance(self.params[name], str):
                self.params[name] = self.params[name].split(",")
        self.conditions = {}

    def condition(self, name):
        if name not in self.conditions:
            self.conditions[name] = bool(self.value(self.tpl["Conditions"][name]))
        return self.conditions[name]

    def value(self, node):
        if isinstance(node, list):
            out = [self.value(v) for v in node]
            return [v for v in out if v is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (key, arg), = node.items()
            if key == "!Ref":
                if arg == "AWS::NoValue":
                    return NO_VALUE
                if arg in self.params:
                    return self.params[arg]
                return {"Ref": arg}
            if key == "!If":
                return self.value(arg[1] if self.condition(arg[0]) else arg[2])
            if key == "!Equals":
                a, b = (self.value(v) for v in arg)
                return a == b
            if key == "!Not":
                return not self.value(arg[0])
            if key == "!And":
                return all(self.value(v) for v in arg)
            if key == "!Or":
                return any(self.value(v) for v in arg)
            if key == "!Condition":
                return self.condition(arg)
            if key == "!Join":
                return arg[0].join(str(v) for v in self.value(arg[1]))
        out = {k: self.value(v) for k, v in node.items()}
        return {k: v for k, v in out.items() if v is not NO_VALUE}


NO_VALUE = object()


# --- Cases ------------------------------------------------------------------


class Stack:
    def __init__(self, aws, name, params):
        self.aws = aws
        self.name = name
        self.params = params
        cf = aws("cloudformation")
        cf.create_stack(
            StackName=name,
            TemplateBody=TEMPLATE.read_text(),
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
            Capabilities=["CAPABILITY_IAM"],
        )
        stack = wait_until(
            "the stack",
            60,
            lambda: next(
                (s for s in cf.describe_stacks(StackName=name)["Stacks"] if s["StackStatus"].endswith("_COMPLETE")),
                None,
            ),
        )
        check(stack["StackStatus"] == "CREATE_COMPLETE", f"stack {name}: {stack['StackStatus']}")
        self.outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        self.resources = {
            r["LogicalResourceId"]: r
            for r in cf.list_stack_resources(StackName=name)["StackResourceSummaries"]
        }
        taskdef = aws("ecs").describe_task_definition(taskDefinition=self.outputs["TaskDefinitionArn"])
        self.taskdef = taskdef["taskDefinition"]
        (self.container,) = self.taskdef["containerDefinitions"]
        # moto returns !Ref AWS::NoValue entries of a list as null, where AWS
        # drops them.
        self.env = {e["name"]: e["value"] for e in self.container.get("environment") or [] if e}
        self.resolver = Resolver(template(), params)


def resolved_resources(stack):
    r = stack.resolver
    out = {}
    for name, res in r.tpl["Resources"].items():
        if "Condition" in res and not r.condition(res["Condition"]):
            continue
        out[name] = {"Type": res["Type"], "Properties": r.value(res.get("Properties", {}))}
    return out


def static_checks(stack):
    """What moto skips, checked from the template with the stack's parameters."""
    resources = resolved_resources(stack)
    skipped = sorted({res["Type"] for res in resources.values() if res["Type"] in UNSUPPORTED_BY_MOTO})
    print(f"  (moto makes none of {', '.join(skipped)}: checked from the template)")
    for name, res in resources.items():
        if res["Type"] in UNSUPPORTED_BY_MOTO:
            physical = stack.resources.get(name, {}).get("PhysicalResourceId")
            check(not physical, f"{name} ({res['Type']}) is still skipped by moto (else test it live)")
    policies = {
        tuple(str(q) for q in res["Properties"]["Queues"]): res["Properties"]["PolicyDocument"]["Statement"]
        for res in resources.values()
        if res["Type"] == "AWS::SQS::QueuePolicy"
    }
    check(
        sorted(q[0] for q in policies) == ["{'Ref': 'DeadLetterQueue'}", "{'Ref': 'JobsQueue'}"],
        "each queue has its policy",
    )
    for queues, statements in policies.items():
        deny = [s for s in statements if s.get("Sid") == "DenyWithoutTls"]
        check(
            len(deny) == 1
            and deny[0]["Effect"] == "Deny"
            and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}},
            f"{queues[0]}: access without TLS is denied",
        )
    jobs_policy = policies[("{'Ref': 'JobsQueue'}",)]
    topics = [t for t in stack.resolver.params["ProducerTopicArns"] if t]
    rules = [t for t in stack.resolver.params["ProducerRuleArns"] if t]
    senders = {s["Principal"]["Service"]: s["Condition"]["ArnEquals"]["aws:SourceArn"]
               for s in jobs_policy if s["Effect"] == "Allow"}
    expected = {}
    if topics:
        expected["sns.amazonaws.com"] = topics
    if rules:
        expected["events.amazonaws.com"] = rules
    check(senders == expected, f"the jobs queue lets exactly the given topics and rules send: {senders}")
    # moto ignores Rules: they are evaluated here, for these parameters and
    # for the ones a rule must refuse.
    check(not broken_rules(stack.resolver), "the parameters pass the template's Rules")
    for params, rule in (({}, "TableIsAChoice"),
                         ({"CreateConnectionsTable": "true", "ExistingTableName": "mine"}, "TableIsAChoice"),
                         ({"CreateConnectionsTable": "true", "TableKmsKeyArn": "arn:aws:kms:x"},
                          "TableKeyIsForAnExistingTable")):
        base = {k: v for k, v in stack.params.items()
                if k not in ("CreateConnectionsTable", "ExistingTableName", "TableKmsKeyArn", "CreateWebSocketApi")}
        base["WebSocketApiId"] = API_ID
        broken = broken_rules(Resolver(stack.resolver.tpl, {**base, **params}))
        check(broken == [rule], f"{rule} refuses {params or 'no table given and none created'}")
    target = next(res for res in resources.values() if res["Type"] == "AWS::ApplicationAutoScaling::ScalableTarget")
    check(
        target["Properties"]["ScalableDimension"] == "ecs:service:DesiredCount"
        and target["Properties"]["MaxCapacity"] == stack.resolver.params["MaxTasks"],
        "the scalable target is the service's desired count, up to MaxTasks",
    )
    return resources


def websocket_checks(stack, resources):
    """The stack's own WebSocket API, which moto does not make: its routes,
    integrations, stage and authorizer from the template with the stack's
    parameters (and with an authorizer), its Rules; the integrations' role
    as IAM holds it."""
    params = stack.resolver.params
    byname = {name: res for name, res in resources.items()}
    api = byname["WebSocketApi"]["Properties"]
    check(api["ProtocolType"] == "WEBSOCKET" and api["RouteSelectionExpression"] == "$request.body.action",
          "a WebSocket API whose routes are selected on the message's action")
    routes = {res["Properties"]["RouteKey"]: res["Properties"] for res in resources.values()
              if res["Type"] == "AWS::ApiGatewayV2::Route"}
    check(sorted(routes) == sorted(["$connect", "$disconnect", "subscribe", "unsubscribe", "$default"]),
          f"the routes $connect, $disconnect, subscribe, unsubscribe, $default ({sorted(routes)})")
    actions = {"$connect": "PutItem", "$disconnect": "DeleteItem", "subscribe": "PutItem",
               "unsubscribe": "DeleteItem"}
    for key, route in routes.items():
        target = route["Target"]["!Sub"]
        integration = byname[target.removeprefix("integrations/${").removesuffix("}")]["Properties"]
        if key == "$default":
            check(integration["IntegrationType"] == "MOCK", "$default (pings and the rest) is answered by nothing")
            continue
        uri = integration["IntegrationUri"]["!Sub"]
        check(integration["IntegrationType"] == "AWS" and uri.endswith(f":dynamodb:action/{actions[key]}")
              and integration["CredentialsArn"] == {"!GetAtt": "WebSocketIntegrationRole.Arn"}
              and "$default" in integration["RequestTemplates"],
              f"{key}: DynamoDB {actions[key]} with the integrations' role and a request template")
    check(routes["$connect"]["AuthorizationType"] == "NONE" and "AuthorizerId" not in routes["$connect"],
          "no AuthorizerFunctionArn: $connect has no authorizer")
    stage = byname["WebSocketStageResource"]["Properties"]
    check(stage["StageName"] == params["WebSocketStage"]
          and stage["DefaultRouteSettings"] == {"ThrottlingRateLimit": params["WebSocketRateLimit"],
                                                "ThrottlingBurstLimit": params["WebSocketBurstLimit"]}
          and all(stage["RouteSettings"][r]["ThrottlingRateLimit"] == params["SubscribeRateLimit"]
                  for r in ("subscribe", "unsubscribe")),
          "the stage is WebSocketStage, throttled per route, subscriptions more tightly")
    check(("AccessLogSettings" in stage) == (params["WebSocketAccessLogs"] == "true")
          and ("WebSocketAccessLogGroup" in stack.resources) == (params["WebSocketAccessLogs"] == "true"),
          f"access logs only with WebSocketAccessLogs ({params['WebSocketAccessLogs']})")
    # With an authorizer (moto's Lambda::Permission wants a real function,
    # so this variant is read from the template only).
    with_auth = Resolver(stack.resolver.tpl, {**stack.params, "AuthorizerFunctionArn":
                                              f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:authorize"})
    authed = resolved_resources(type("S", (), {"resolver": with_auth})())
    connect = next(r["Properties"] for r in authed.values()
                   if r["Type"] == "AWS::ApiGatewayV2::Route" and r["Properties"]["RouteKey"] == "$connect")
    auth = authed["WebSocketAuthorizer"]["Properties"]
    check(connect["AuthorizationType"] == "CUSTOM" and connect["AuthorizerId"] == {"Ref": "WebSocketAuthorizer"}
          and auth["AuthorizerType"] == "REQUEST"
          and auth["IdentitySource"] == [params["AuthorizerIdentitySource"]]
          and authed["WebSocketAuthorizerPermission"]["Properties"]["Principal"] == "apigateway.amazonaws.com",
          "with AuthorizerFunctionArn: a REQUEST authorizer on $connect, which API Gateway may invoke")
    # The integrations' role, as IAM holds it.
    iam = stack.aws("iam")
    role = stack.resources["WebSocketIntegrationRole"]["PhysicalResourceId"]
    doc = policy_document(iam.get_role_policy(RoleName=role, PolicyName="fanout-websocket-rows"))
    (stmt,) = doc["Statement"]
    table_arn = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{stack.outputs['TableName']}"
    check(sorted(stmt["Action"]) == ["dynamodb:DeleteItem", "dynamodb:PutItem"] and stmt["Resource"] == table_arn
          and sorted(stmt["Condition"]["ForAllValues:StringEquals"]["dynamodb:Attributes"])
          == sorted(["connectionId", "sk", "channel", "connectedAt", "expiresAt", "userId"]),
          "API Gateway's role: PutItem and DeleteItem on the table, the templates' attributes only")
    trust = policy_document({"PolicyDocument": iam.get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"]})
    check(trust["Statement"][0]["Principal"] == {"Service": "apigateway.amazonaws.com"},
          "only API Gateway assumes it")
    table = stack.aws("dynamodb").describe_table(TableName=stack.outputs["TableName"])["Table"]
    check([k["AttributeName"] for k in table["KeySchema"]] == ["connectionId", "sk"]
          and {i["IndexName"]: [k["AttributeName"] for k in i["KeySchema"]] for i in table["GlobalSecondaryIndexes"]}
          == {"by-channel": ["channel", "connectionId"], "by-user": ["userId"]},
          "the table: connectionId + sk, by-channel on channel + connectionId, by-user on userId")
    for params_, rule in (({"WebSocketApiId": API_ID}, "WebSocketApiIsAChoice"),
                          ({"CreateConnectionsTable": "true"}, "TableIsAChoice"),
                          ({"ChannelIndexName": ""}, "WebSocketApiLayout"),
                          ({"AudienceIndexes": "team=by-team:teamId"}, "WebSocketApiLayout")):
        broken = broken_rules(Resolver(stack.resolver.tpl, {**stack.params, **params_}))
        check(broken == [rule], f"{rule} refuses CreateWebSocketApi with {params_} ({broken})")
    neither = broken_rules(Resolver(stack.resolver.tpl, {k: v for k, v in stack.params.items()
                                                         if k != "CreateWebSocketApi"}))
    check(sorted(neither) == ["TableIsAChoice", "WebSocketApiIsAChoice"],
          f"without CreateWebSocketApi, neither an API nor a table is given: refused ({neither})")


def broken_rules(resolver):
    """The template's Rules whose assertions fail for the resolver's parameters."""
    broken = []
    for name, rule in resolver.tpl.get("Rules", {}).items():
        if "RuleCondition" in rule and not resolver.value(rule["RuleCondition"]):
            continue
        if not all(resolver.value(a["Assert"]) for a in rule["Assertions"]):
            broken.append(name)
    return broken


def alarm_metrics(resources, params):
    """Every (namespace, metric, {dimension: value}) an alarm or the
    dashboard reads that the worker emits (not AWS's own namespaces)."""
    metrics = []
    for name, res in resources.items():
        if res["Type"] not in ("AWS::CloudWatch::Alarm", "AWS::CloudWatch::Dashboard"):
            continue
        p = res["Properties"]
        found = dashboard_metrics(p, params) if res["Type"] == "AWS::CloudWatch::Dashboard" else []
        if "MetricName" in p:
            found.append((p["Namespace"], p["MetricName"], p.get("Dimensions", [])))
        for m in p.get("Metrics", []):
            if "MetricStat" in m:
                metric = m["MetricStat"]["Metric"]
                found.append((metric["Namespace"], metric["MetricName"], metric.get("Dimensions", [])))
        for namespace, metric, dims in found:
            if namespace.startswith("AWS/") or namespace == "ECS/ContainerInsights":
                continue
            metrics.append((name, namespace, metric, {d["Name"]: d["Value"] for d in dims}))
    return metrics


def dashboard_metrics(properties, params):
    """The (namespace, metric, dimensions) a dashboard's widgets read. The
    body is a `!Sub` of JSON: parameters are put in, other references
    (`${AWS::Region}`, `${JobsQueue.QueueName}`) stay as text."""
    body = properties["DashboardBody"]
    text = body["!Sub"] if isinstance(body, dict) else body
    text = re.sub(
        r"\$\{([A-Za-z0-9]+)\}",
        lambda m: str(params[m.group(1)]) if isinstance(params.get(m.group(1)), str) else m.group(0),
        text,
    )
    found = []
    for widget in json.loads(text)["widgets"]:
        for metric in widget.get("properties", {}).get("metrics", []):
            names = [m for m in metric if isinstance(m, str)]
            namespace, name, pairs = names[0], names[1], names[2:]
            dims = [{"Name": k, "Value": v} for k, v in zip(pairs[::2], pairs[1::2])]
            found.append((namespace, name, dims))
    return found


def emf_lines(log_text):
    lines = []
    for line in log_text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "_aws" in entry:
            lines.append(entry)
    return lines


def emitted(lines, namespace, metric, dims):
    for entry in lines:
        for directive in entry["_aws"].get("CloudWatchMetrics", []):
            names = {m["Name"] for m in directive.get("Metrics", [])}
            if (
                directive.get("Namespace") == namespace
                and metric in names
                and sorted(dims) in [sorted(d) for d in directive.get("Dimensions", [])]
                and all(entry.get(k) == v for k, v in dims.items())
                and isinstance(entry.get(metric), (int, float))
            ):
                return True
    return False


class Worker:
    """The task definition's container, run from the image or the binary."""

    def __init__(self, stack, opts, env, log):
        self.stack, self.opts, self.env, self.log = stack, opts, env, log
        c = stack.container
        self.command = c.get("command") or []
        self.health = (c.get("healthCheck") or {}).get("command") or []
        self.name = f"fanout-stack-{stack.name}-{os.getpid()}"
        if opts.image:
            args = ["podman", "run", "-d", "--name", self.name, "--network", "host", "--no-healthcheck"]
            if c.get("readonlyRootFilesystem"):
                args.append("--read-only")
            if c.get("user"):
                args += ["--user", c["user"]]
            for key in env:
                args += ["-e", key]
            subprocess.run(args + [opts.image] + self.command, check=True, capture_output=True,
                           env={**os.environ, **env})
            CONTAINERS.append(self.name)
            self.proc = None
        else:
            self.proc = start([opts.binary] + self.command, log, env={**os.environ, **env})

    def running(self):
        if self.proc:
            return self.proc.poll() is None
        out = subprocess.run(["podman", "inspect", "--format", "{{.State.Running}}", self.name],
                             capture_output=True, text=True)
        return out.stdout.strip() == "true"

    def health_check(self):
        kind, *command = self.health
        assert kind == "CMD", self.health
        if self.opts.image:
            args = ["podman", "exec", self.name] + command
        else:
            args = [self.opts.binary if command[0] == "/fanout" else command[0]] + command[1:]
        return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **self.env})

    def stop(self, timeout):
        """SIGTERM, as ECS sends it; the exit status and the seconds taken."""
        started = time.monotonic()
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(timeout=timeout + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                status = "killed"
        else:
            subprocess.run(["podman", "kill", "--signal", "TERM", self.name], capture_output=True)
            out = subprocess.run(["podman", "wait", self.name], capture_output=True, text=True,
                                 timeout=timeout + 5)
            status = int(out.stdout.strip() or -1)
            logs = subprocess.run(["podman", "logs", self.name], capture_output=True, text=True)
            Path(self.log).write_text(logs.stdout + logs.stderr)
            subprocess.run(["podman", "rm", self.name], capture_output=True)
            CONTAINERS.remove(self.name)
        return status, time.monotonic() - started

    def log_text(self):
        if self.opts.image and self.name in CONTAINERS:
            logs = subprocess.run(["podman", "logs", self.name], capture_output=True, text=True)
            return logs.stdout + logs.stderr
        return Path(self.log).read_text() if Path(self.log).exists() else ""


def fanout_cli(opts, env, *args):
    """`fanout …` as a producer runs it: the image when there is one."""
    if opts.image:
        cmd = ["podman", "run", "--rm", "--network", "host", "--no-healthcheck", "--read-only",
               "--user", "65532:65532"]
        for key in env:
            cmd += ["-e", key]
        cmd += [opts.image, *args]
    else:
        cmd = [opts.binary, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if out.returncode != 0:
        fail(f"fanout {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def clients(opts, work, url, name, count, **kw):
    args = [opts.dev, "clients", "--url", url, "--count", str(count),
            "--ready-file", str(work / f"{name}.ready"), "--summary-file", str(work / f"{name}.summary.json")]
    for key, value in kw.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return start(args, work / f"{name}.log")


def got(summary, text):
    return next((p["clients"] for p in summary["payloads"] if p["preview"] == text), 0)


def run_case(opts, aws, endpoints, work, case):
    say(f"case {case['name']}: {case['about']}")
    work = work / case["name"]
    work.mkdir(parents=True, exist_ok=True)
    ddb, sqs = aws("dynamodb"), aws("sqs")
    if case.get("existing_table"):
        spec = case["existing_table"]
        ddb.create_table(
            TableName=spec["name"],
            AttributeDefinitions=[{"AttributeName": spec["key"], "AttributeType": "S"}],
            KeySchema=[{"AttributeName": spec["key"], "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
    stack = Stack(aws, case["name"], case["params"])
    env = stack.env
    print(f"  task definition {stack.outputs['TaskDefinitionArn']}: command {stack.container.get('command')}, "
          f"user {stack.container.get('user')}, read-only {stack.container.get('readonlyRootFilesystem')}, "
          f"{len(env)} variables")
    for key, value in case["expect_env"].items():
        check(env.get(key) == value, f"the task's {key} is {value!r} (it is {env.get(key)!r})")
    for key in case["expect_no_env"]:
        check(key not in env, f"the task sets no {key}")
    if case["params"].get("CreateWebSocketApi") == "true":
        # moto makes no API, so its id is not known here: the endpoint is
        # the stack's output, built from the API's own id.
        check(env["FANOUT_GATEWAY_ENDPOINT"] == stack.outputs["ManagementEndpoint"]
              and stack.outputs["WebSocketUrl"].startswith("wss://")
              and stack.outputs["WebSocketUrl"].endswith(f".execute-api.{REGION}.amazonaws.com/{STAGE}"),
              f"the task's management endpoint is the stack's own API ({env['FANOUT_GATEWAY_ENDPOINT']}), "
              f"clients connect at {stack.outputs['WebSocketUrl']}")
    else:
        check(
            env["FANOUT_GATEWAY_ENDPOINT"] == f"https://{API_ID}.execute-api.{REGION}.amazonaws.com/{STAGE}"
            and stack.outputs["ManagementEndpoint"] == env["FANOUT_GATEWAY_ENDPOINT"],
            "the task's management endpoint is the API's stage",
        )
    iam = aws("iam")
    role = stack.resources["ExecutionRole"]["PhysicalResourceId"]
    statements = policy_document(iam.get_role_policy(RoleName=role, PolicyName="fanout-execution"))["Statement"]
    pull = next(s for s in statements if s.get("Sid") == "PullTheImage")
    check(pull["Resource"] == f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/team/fanout",
          f"the execution role pulls from the image's repository only ({pull['Resource']})")
    check(next(s for s in statements if s.get("Sid") == "LogInToEcr")["Resource"] == "*",
          "ecr:GetAuthorizationToken on *, as ECR requires")
    if case["params"].get("TableKmsKeyArn"):
        task_role = stack.resources["TaskRole"]["PhysicalResourceId"]
        names = iam.list_role_policies(RoleName=task_role)["PolicyNames"]
        check("fanout-table-key" in names, f"the task role holds the table key's policy ({names})")
        doc = policy_document(iam.get_role_policy(RoleName=task_role, PolicyName="fanout-table-key"))
        (stmt,) = doc["Statement"]
        check(stmt["Resource"] == case["params"]["TableKmsKeyArn"]
              and sorted(stmt["Action"]) == ["kms:Decrypt", "kms:DescribeKey"]
              and stmt["Condition"]["StringEquals"]["kms:ViaService"] == f"dynamodb.{REGION}.amazonaws.com",
              "the table's key: kms:Decrypt and DescribeKey, through DynamoDB only")
    resources = static_checks(stack)
    if case["params"].get("CreateWebSocketApi") == "true":
        websocket_checks(stack, resources)
    metrics = alarm_metrics(resources, stack.resolver.params)

    # The local gateway writes $connect rows keyed connectionId; for a table
    # with other names the rows are copied over, as the user's handler would
    # have written them.
    table = stack.outputs["TableName"]
    gateway_table = table if not case.get("existing_table") else f"{case['name']}-gateway-rows"
    port = free_port(8190)
    gateway_args = [opts.dev, "gateway", "--listen", f"127.0.0.1:{port}", "--stage", STAGE,
                    "--table", gateway_table, "--keep-stale"]
    if case["params"].get("CreateWebSocketApi") == "true":
        # The rows the stack's own API writes (its request templates; the
        # tests compare the two).
        gateway_args += ["--layout", "memberships"]
    if gateway_table != table:
        gateway_args.append("--create-table")
    start(gateway_args, work / "gateway.log", env={**os.environ, **endpoints})
    wait_until("the gateway", 30, lambda: port_open(port))
    url = f"ws://127.0.0.1:{port}/{STAGE}"
    groups = case["clients"]
    procs = {g["name"]: clients(opts, work, url, g["name"], g["count"] + g.get("drop", 0),
                                drop=g.get("drop", 0), expect_frames=len(g["expect"]),
                                **({"channel": g["channel"]} if g.get("channel") else {}))
             for g in groups}
    wait_until("the clients", 60, lambda: all((work / f"{g['name']}.ready").exists() for g in groups))
    time.sleep(1)
    if gateway_table != table:
        spec = case["existing_table"]
        rows = ddb.scan(TableName=gateway_table)["Items"]
        with_channel = [r for r in rows if "channel" in r]
        for r in rows:
            item = {spec["key"]: r["connectionId"]}
            if "connectedAt" in r:
                item["connectedAt"] = r["connectedAt"]
            if "channel" in r:
                item[case["params"]["ChannelAttribute"]] = r["channel"]
            ddb.put_item(TableName=table, Item=item)
        print(f"  {len(rows)} rows copied into {table} as {spec['key']} ({len(with_channel)} with a channel)")
    live = sum(g["count"] for g in groups)
    rows_before = ddb.scan(TableName=table, Select="COUNT")["Count"]
    check(rows_before == live + sum(g.get("drop", 0) for g in groups),
          f"{rows_before} rows before: {live} live, the rest gone without a $disconnect")

    producer_env = {**endpoints, "FANOUT_QUEUE_URL": stack.outputs["JobsQueueUrl"]}
    for job in case["jobs"]:
        if job.get("raw"):
            extra = {"MessageGroupId": "raw", "MessageDeduplicationId": "raw"} if stack.outputs["JobsQueueUrl"].endswith(".fifo") else {}
            sqs.send_message(QueueUrl=stack.outputs["JobsQueueUrl"], MessageBody=job["raw"], **extra)
        else:
            fanout_cli(opts, producer_env, "enqueue", *job["args"])

    # The task's own environment; only the endpoints are local.
    # The local gateway completes $connect at once, so a client dropped a
    # second ago is already gone: a short connect window lets its row go on
    # the recheck within the test, where API Gateway needs the task's 2 min.
    worker_env = {**env, **endpoints,
                  "FANOUT_GATEWAY_ENDPOINT": f"http://127.0.0.1:{port}/{STAGE}",
                  "FANOUT_CONNECT_WINDOW": "2s"}
    if not port_free(9102):
        worker_env["FANOUT_METRICS_LISTEN"] = f"127.0.0.1:{free_port(9200)}"
        print(f"  (127.0.0.1:9102 is taken here: metrics on {worker_env['FANOUT_METRICS_LISTEN']})")
    say(f"case {case['name']}: the worker, as the task runs it ({'image ' + opts.image if opts.image else opts.binary})")
    started = time.monotonic()
    worker = Worker(stack, opts, worker_env, work / "worker.log")
    good = sum(1 for j in case["jobs"] if not j.get("dead"))
    dead_expected = sum(1 for j in case["jobs"] if j.get("dead"))

    def settled():
        if not worker.running():
            fail(f"the worker exited early: {worker.log_text()[-2000:]}")
        reports = [l for l in worker.log_text().splitlines() if '"message":"broadcast"' in l]
        attrs = sqs.get_queue_attributes(QueueUrl=stack.outputs["JobsQueueUrl"],
                                         AttributeNames=["ApproximateNumberOfMessages",
                                                         "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        dlq = sqs.get_queue_attributes(QueueUrl=stack.outputs["DeadLetterQueueUrl"],
                                       AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
        return (len(reports) >= good and int(dlq["ApproximateNumberOfMessages"]) >= dead_expected
                and attrs["ApproximateNumberOfMessages"] == "0"
                and attrs["ApproximateNumberOfMessagesNotVisible"] == "0")

    wait_until("the broadcasts", 90, settled, interval=0.5)
    print(f"  all jobs settled {time.monotonic() - started:.1f} s after the start")
    # A first 410 from a connection that may still be connecting is posted
    # to again after the connect window; its row goes on the second.
    wait_until("the gone rows' rechecks", 30,
               lambda: ddb.scan(TableName=table, Select="COUNT")["Count"] == live, interval=0.5)
    health = wait_until("the health check", 20, lambda: (lambda r: r if r.returncode == 0 else None)(worker.health_check()))
    check(health.returncode == 0, f"the task's health check {stack.container['healthCheck']['command']} passes")
    stop_timeout = stack.container.get("stopTimeout") or 30
    status, took = worker.stop(stop_timeout)
    check(status == 0, f"SIGTERM: the worker exited {status} in {took:.1f} s (stop timeout {stop_timeout} s)")
    log = Path(work / "worker.log").read_text()

    for proc in procs.values():
        proc.send_signal(signal.SIGINT)
    wait_until("the clients' summaries", 30,
               lambda: all((work / f"{g['name']}.summary.json").exists() for g in groups))
    for g in groups:
        summary = json.loads((work / f"{g['name']}.summary.json").read_text())
        for text in g["expect"]:
            check(got(summary, text) == g["count"], f"{g['name']}: all {g['count']} live clients got {text!r}")
        check(summary["clients_with_duplicates"] == 0 and len(summary["payloads"]) == len(g["expect"]),
              f"{g['name']}: nothing else, nothing twice")
    rows_after = ddb.scan(TableName=table, Select="COUNT")["Count"]
    check(rows_after == live, f"the gone connections' rows were removed ({rows_before} -> {rows_after})")
    dead = sqs.receive_message(QueueUrl=stack.outputs["DeadLetterQueueUrl"], MaxNumberOfMessages=10,
                               MessageAttributeNames=["All"], WaitTimeSeconds=1).get("Messages", [])
    reasons = [m.get("MessageAttributes", {}).get("fanout.reason", {}).get("StringValue") for m in dead]
    check(len(dead) == dead_expected and all(reasons),
          f"{dead_expected} bad job(s) dead-lettered with a reason: {reasons}")

    lines = emf_lines(log)
    check(bool(lines), f"the worker printed {len(lines)} EMF lines")
    for alarm, namespace, metric, dims in metrics:
        check(emitted(lines, namespace, metric, dims),
              f"{alarm} reads {namespace}/{metric} {dims}: emitted so")
    return stack


def policy_document(answer):
    """GetRolePolicy's document: JSON, URL-encoded as IAM returns it; moto
    returns a policy that CloudFormation made as a Python literal."""
    doc = answer["PolicyDocument"]
    if isinstance(doc, str):
        text = urllib.parse.unquote(doc)
        try:
            doc = json.loads(text)
        except ValueError:
            doc = ast.literal_eval(text)
    return doc


def port_open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def port_free(port):
    return not port_open(port)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--moto", required=True, help="moto_server's URL")
    parser.add_argument("--image", help="the fanout image to run the worker from")
    parser.add_argument("--binary", help="the fanout binary, when there is no image")
    parser.add_argument("--dev", required=True, help="the fanout-dev binary (gateway, clients)")
    parser.add_argument("--work", required=True)
    opts = parser.parse_args()
    if not opts.image and not opts.binary:
        fail("give --image or --binary")
    endpoints = {
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_SQS": opts.moto,
        "AWS_ENDPOINT_URL_DYNAMODB": opts.moto,
        "AWS_ENDPOINT_URL_SNS": opts.moto,
    }
    os.environ.update({k: v for k, v in endpoints.items()})

    def aws(service):
        return boto3.client(service, endpoint_url=opts.moto, region_name=REGION,
                            aws_access_key_id="test", aws_secret_access_key="test")

    base = {
        "WebSocketApiId": API_ID,
        "WebSocketStage": STAGE,
        "Image": IMAGE_URI,
        "Subnets": "subnet-0123456789abcdef0",
        "SecurityGroups": "sg-0123456789abcdef0",
    }
    cases = [
        {
            "name": "fanout-created",
            "about": "a created table (key connectionId, channel index), a Service dimension of its own, SNS and EventBridge producers",
            "params": {**base, "CreateConnectionsTable": "true", "MetricsServiceName": "fanout-ci",
                       "ProducerTopicArns": f"arn:aws:sns:{REGION}:{ACCOUNT}:news,arn:aws:sns:{REGION}:{ACCOUNT}:alerts",
                       "ProducerRuleArns": f"arn:aws:events:{REGION}:{ACCOUNT}:rule/broadcasts"},
            "expect_env": {"FANOUT_KEY_ATTRIBUTE": "connectionId", "FANOUT_CHANNEL_INDEX": "by-channel",
                           "FANOUT_CHANNEL_ATTRIBUTE": "channel", "FANOUT_METRICS_SERVICE": "fanout-ci",
                           "FANOUT_DEDUP_WINDOW": "24h", "FANOUT_FLEET_RATE_PER_SECOND": "2000",
                           "FANOUT_FLEET_FALLBACK_RATE": "200"},
            "expect_no_env": ["FANOUT_AUDIENCE_INDEXES"],
            "clients": [
                {"name": "plain", "count": 30, "drop": 10, "expect": ["hello, everyone"]},
                {"name": "news", "count": 10, "channel": "news", "expect": ["hello, everyone", "news only"]},
            ],
            "jobs": [
                {"args": ["--data", "hello, everyone"]},
                {"args": ["--data", "news only", "--channel", "news"]},
                {"raw": "not a job", "dead": True},
            ],
        },
        {
            "name": "fanout-websocket",
            "about": "the stack's own WebSocket API (CreateWebSocketApi): its table keyed connectionId + sk, "
                     "the task pointed at the API, access logs on",
            "params": {**{k: v for k, v in base.items() if k != "WebSocketApiId"},
                       "CreateWebSocketApi": "true", "WebSocketAccessLogs": "true"},
            "expect_env": {"FANOUT_KEY_ATTRIBUTE": "connectionId", "FANOUT_CHANNEL_INDEX": "by-channel",
                           "FANOUT_CHANNEL_ATTRIBUTE": "channel", "FANOUT_CONNECTED_AT_ATTRIBUTE": "connectedAt",
                           "FANOUT_AUDIENCE_INDEXES": "user=by-user:userId"},
            # The table is partitioned by the connection id: a Scan keeps a
            # connection's rows together, no connection index needed.
            "expect_no_env": ["FANOUT_CONNECTION_INDEX"],
            "clients": [
                {"name": "plain", "count": 20, "drop": 5, "expect": ["hello, own API"]},
                {"name": "match", "count": 5, "channel": "public.match-42",
                 "expect": ["hello, own API", "match only"]},
            ],
            "jobs": [
                {"args": ["--data", "hello, own API"]},
                {"args": ["--data", "match only", "--channel", "public.match-42"]},
                {"raw": "not a job", "dead": True},
            ],
        },
        {
            "name": "fanout-existing",
            "about": "an existing table keyed connId, channels in 'room' with no index, a FIFO jobs queue, idempotency off, a customer-managed key",
            "existing_table": {"name": "user-connections", "key": "connId"},
            "params": {**base, "ExistingTableName": "user-connections", "KeyAttribute": "connId",
                       "ChannelAttribute": "room", "ChannelIndexName": "", "IdempotencyWindow": "",
                       "FifoJobsQueue": "true",
                       "TableKmsKeyArn": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"},
            "expect_env": {"FANOUT_KEY_ATTRIBUTE": "connId", "FANOUT_CHANNEL_ATTRIBUTE": "room",
                           "FANOUT_TABLE": "user-connections", "FANOUT_METRICS_SERVICE": "fanout"},
            "expect_no_env": ["FANOUT_CHANNEL_INDEX", "FANOUT_CHECKPOINT_TABLE", "FANOUT_DEDUP_WINDOW",
                              "FANOUT_AUDIENCE_INDEXES"],
            "clients": [
                {"name": "plain", "count": 20, "drop": 5, "expect": ["hello, existing table"]},
                {"name": "room", "count": 5, "channel": "news", "expect": ["hello, existing table"]},
            ],
            "jobs": [
                {"args": ["--data", "hello, existing table"]},
                # No channel index: a channel job is dead-lettered, not run.
                {"args": ["--data", "news only", "--channel", "news"], "dead": True},
            ],
        },
    ]
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        for case in cases:
            run_case(opts, aws, endpoints, work, case)
            stop_all()
            PROCS.clear()
    finally:
        stop_all()
    say(f"ok: {len(cases)} stacks created on moto and run as deployed, in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
